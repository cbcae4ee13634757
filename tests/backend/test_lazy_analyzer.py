"""The app's analyzer is built once: in the background once the app serves, or by the first request that needs it."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from backend.services import analyze
from backend.services.lazy_analyzer import LazyAnalyzer


class SlowAnalyzer:
    """Counts how often it is built; building takes long enough for concurrent requests to meet."""

    built = 0

    def __init__(self, data_dir, device):
        SlowAnalyzer.built += 1
        time.sleep(0.2)
        self.data_dir, self.device, self.closed = data_dir, device, False

    def loaded(self):
        return 2

    def close(self):
        self.closed = True


def test_concurrent_first_requests_build_one_analyzer_on_the_device_asked_then(monkeypatch, tmp_path):
    monkeypatch.setattr(analyze, "Analyzer", SlowAnalyzer)
    monkeypatch.setattr(SlowAnalyzer, "built", 0)
    asked = []
    lazy = LazyAnalyzer(tmp_path, lambda: asked.append(threading.get_ident()) or "cpu")
    assert lazy.loaded() == 0 and not asked, "nothing is built, nor the device resolved, before it is needed"
    lazy.close()
    assert SlowAnalyzer.built == 0, "closing an analyzer never needed builds none"
    with ThreadPoolExecutor(8) as pool:
        devices = list(pool.map(lambda _: lazy.device, range(8)))
    assert SlowAnalyzer.built == 1 and len(asked) == 1 and devices == ["cpu"] * 8
    assert lazy.get() is lazy.get() and lazy.data_dir == tmp_path and lazy.loaded() == 2
    lazy.close()
    assert lazy.get().closed


def test_prepare_builds_it_in_the_background_once_and_a_failed_build_is_the_next_requests_to_report(monkeypatch, tmp_path):
    monkeypatch.setattr(analyze, "Analyzer", SlowAnalyzer)
    monkeypatch.setattr(SlowAnalyzer, "built", 0)
    lazy = LazyAnalyzer(tmp_path, lambda: "cpu")
    lazy.prepare()
    lazy.prepare()  # a second form opened while the first build runs
    assert lazy._analyzer is None, "prepare returns before the build ends"
    assert sum(t.name == "clipscope-analyzer" for t in threading.enumerate()) == 1
    deadline = time.monotonic() + 10
    while lazy._analyzer is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert SlowAnalyzer.built == 1 and lazy.loaded() == 2

    def no_gpu():
        raise RuntimeError("no GPU")

    failing = LazyAnalyzer(tmp_path, no_gpu)
    failing.prepare()
    deadline = time.monotonic() + 10
    while any(t.name == "clipscope-analyzer" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="no GPU"):
        failing.get()
