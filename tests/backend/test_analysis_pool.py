"""The analysis queue batches what can share a forward pass and never mixes what cannot."""

import threading
from types import SimpleNamespace

import pytest

from backend.services.analysis_pool import AnalysisInterrupted, AnalysisPool, PoolClosed, PoolFull
from backend.services.prediction import Question


class RecordingAnalyzer:
    """Answers each image with what it was asked; the first call waits until released, so later
    submissions queue up and are taken together."""

    def __init__(self):
        self.calls, self.release, self.started = [], threading.Event(), threading.Event()

    closed = False

    def close(self):
        self.closed = True

    def analyse(self, sae, images, occlude=False, question=None):
        self.calls.append((sae.key, occlude, question, list(images)))
        self.started.set()
        self.release.wait(10)
        return [(sae.key, image, occlude, question) for image in images]


def test_one_batch_per_sae_occlusion_and_question_each_upload_gets_its_own_answer():
    analyzer = RecordingAnalyzer()
    pool = AnalysisPool(analyzer, queue_size=16, max_batch=16)
    a, b = SimpleNamespace(key="a"), SimpleNamespace(key="b")
    cats, dogs = Question(("cat", "dog")), Question(("cat", "dog"), target=1)
    first = pool.submit(a, "warm-up")
    assert analyzer.started.wait(10)
    asks = [(a, "1", False, None), (a, "2", False, cats), (b, "3", False, cats), (a, "4", True, None),
            (a, "5", False, cats), (a, "6", False, dogs), (a, "7", False, None)]
    futures = [pool.submit(sae, image, occlude, question) for sae, image, occlude, question in asks]
    analyzer.release.set()
    assert first.result(10) == ("a", "warm-up", False, None)
    for (sae, image, occlude, question), future in zip(asks, futures):
        assert future.result(10) == (sae.key, image, occlude, question)
    batches = {(key, occlude, question): images for key, occlude, question, images in analyzer.calls[1:]}
    assert batches == {("a", False, None): ["1", "7"], ("a", False, cats): ["2", "5"], ("b", False, cats): ["3"],
                       ("a", True, None): ["4"], ("a", False, dogs): ["6"]}


def test_a_full_queue_refuses_at_once():
    analyzer = RecordingAnalyzer()
    pool = AnalysisPool(analyzer, queue_size=1, max_batch=1)
    sae = SimpleNamespace(key="a")
    pool.submit(sae, "running")
    assert analyzer.started.wait(10)
    pool.submit(sae, "queued")
    with pytest.raises(PoolFull):
        pool.submit(sae, "one too many")
    analyzer.release.set()


def test_closing_ends_the_worker_after_its_batch_fails_what_is_queued_and_lets_go_of_the_models():
    analyzer = RecordingAnalyzer()
    pool = AnalysisPool(analyzer, queue_size=4, max_batch=1)
    sae = SimpleNamespace(key="a")
    running = pool.submit(sae, "running")
    assert analyzer.started.wait(10)
    queued = pool.submit(sae, "queued")
    worker = pool._thread
    threading.Timer(0.3, analyzer.release.set).start()  # the batch in hand ends while close waits for it
    pool.close(timeout=10)
    assert not worker.is_alive() and analyzer.closed
    assert running.result(1) == ("a", "running", False, None), "the batch in hand is finished"
    with pytest.raises(PoolClosed):
        queued.result(1)
    assert pool.submit(sae, "after").result(10) == ("a", "after", False, None), "a later upload starts a worker again"
    pool.close(timeout=10)


def test_the_app_s_shutdown_closes_its_analysis(web_data, tmp_path):
    from fastapi.testclient import TestClient

    from tests.backend.conftest import private_app

    app = private_app(web_data, tmp_path)
    with TestClient(app) as client:
        assert client.post(f"/api/saes/{web_data[1]}/analyze", files={"file": ("x.png", _png(), "image/png")}).status_code == 200
        worker, analyzer = app.state.analysis._thread, app.state.analysis.analyzer
        assert worker.is_alive() and analyzer.loaded() == 2
    assert not worker.is_alive() and analyzer.loaded() == 0, "CLIP and the SAE are let go"


@pytest.mark.parametrize("error, retry_after, words", [
    (PoolClosed("The server shut down before this upload was analysed."), "5", "shutting down"),
    (AnalysisInterrupted("The analysis was interrupted (KeyboardInterrupt); try again."), "1", "interrupted"),
], ids=["shutdown", "interrupted"])
def test_an_upload_the_pool_left_unanswered_is_a_503_to_retry(web, error, retry_after, words):
    from concurrent.futures import Future

    client, key = web
    failed = Future()
    failed.set_exception(error)
    client.app.state.analysis.submit = lambda *args, **kwargs: failed
    r = client.post(f"/api/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")})
    assert r.status_code == 503 and r.headers["Retry-After"] == retry_after and words in r.json()["detail"]


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buf, format="PNG")
    return buf.getvalue()


def test_saes_over_one_clip_share_it_and_a_retrained_sae_is_read_again(web_data, tmp_path):
    from datetime import datetime

    import torch

    from backend.services.analyze import Analyzer
    from clipscope.db.models import Sae
    from clipscope.sae.io import load_sae, save_sae

    settings, key = web_data
    trained, meta = load_sae(settings.data_dir / "saes" / key / "sae")
    rows = {}
    for name, model in (("a", {"layer": 10}), ("b", {"layer": 9, "tokens": "all"}), ("c", {"layer": 10, "init_seed": 1})):
        save_sae(trained, tmp_path / "saes" / name / "sae", meta)
        rows[name] = Sae(key=name, config={"model": {"pretrained": "none", **model}}, updated_at=datetime(2026, 11, 1))
    analyzer = Analyzer(tmp_path, "cpu", capacity=4)
    a, b = analyzer._get(rows["a"]), analyzer._get(rows["b"])
    assert a.clip is b.clip and analyzer.loaded() == 3, "one CLIP for two SAEs over the same weights"
    assert analyzer._get(rows["c"]).clip is not a.clip, "other weights (another random seed): another CLIP"
    retrained = type(trained)(768, 64, 8)
    save_sae(retrained, tmp_path / "saes" / "a" / "sae", meta)
    assert analyzer.sae(rows["a"]) is a.sae, "the same version of the row: kept"
    rows["a"].updated_at = datetime(2026, 11, 2)  # what the pipeline's write of a retrained SAE does
    assert torch.equal(analyzer.sae(rows["a"]).W_dec, retrained.W_dec) and not torch.equal(retrained.W_dec, trained.W_dec)


class InterruptingAnalyzer(RecordingAnalyzer):
    """Interrupted (a ``KeyboardInterrupt`` in the worker thread) on its first batch of SAE "a"."""

    def analyse(self, sae, images, occlude=False, question=None):
        if sae.key == "a" and not self.calls:
            self.calls.append(sae.key)
            raise KeyboardInterrupt
        return [(sae.key, image, occlude, question) for image in images]


def test_an_interrupted_worker_fails_every_upload_it_took_and_the_next_upload_starts_another(monkeypatch):
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's end is expected here
    analyzer = InterruptingAnalyzer()
    pool = AnalysisPool(analyzer, queue_size=8, max_batch=8)
    a, b = SimpleNamespace(key="a"), SimpleNamespace(key="b")
    pool._ensure_worker = lambda: None  # queue both before a worker takes them: one batch, two groups
    taken = [pool.submit(a, "1"), pool.submit(b, "2")]
    del pool._ensure_worker
    pool._ensure_worker()
    for future in taken:  # the group that ran and the group after it: neither waits for ever
        with pytest.raises(AnalysisInterrupted, match="KeyboardInterrupt"):
            future.result(10)
    pool._thread.join(10)
    assert not pool._thread.is_alive()
    assert pool.submit(b, "3").result(10) == ("b", "3", False, None), "a later upload starts a worker again"
    pool.close(timeout=10)
