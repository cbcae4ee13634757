"""Serving: requests/s and p50/p99 of the feature page and the feature list with 49,152 features x 12
examples in SQLite, each against a static file of its own size served by the same server; then the
latency of analyzing a 512 x 512 JPEG, of explaining its zero-shot prediction over ten classes, of
three feature edits and the prediction after them, and the throughput under 8 concurrent uploads; a
feature's closest features in a second SAE at the same site (the first request reads both SAEs' atoms);
the page of an image of the precompute set (every feature it fires, from the activation cache); and the
features a set of eight uploads shares, against eight single analyses; and the server's start (to its
first answer) and resident memory after its start, after the page loads and at the end, with its peak.

The server is a real `clipscope serve` process; the load comes from threads in this process, on
loopback only, bounded in count and time. The loads start once the server's work in the background
is done (torch's import after its start, the list's kept rows after its first list page).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scratch import scratch_dir  # noqa: E402


def build_database(data_dir: Path, d_sae: int, k: int, n_images: int, url: str | None = None) -> str:
    """The serving benchmarks' SAE (``d_sae`` features x 12 examples over ``n_images`` images, activation cache and
    weights) and a second SAE at its site, in ``url`` (default: SQLite under ``data_dir``); returns the first's key."""
    from sqlalchemy import insert

    from clipscope.activation_cache import ActivationCache
    from clipscope.config import ModelConfig, parse_config
    from clipscope.db import migrate
    from clipscope.db.bulk import analyze
    from clipscope.db.models import Feature, FeatureExample, Image as ImageRow, Sae, SaeStatus
    from clipscope.db.session import session_scope
    from clipscope.sae.io import save_sae
    from clipscope.sae.model import TopKSAE
    from clipscope.thumbnails import ensure_thumbnail

    url = url or f"sqlite:///{data_dir / 'clipscope.db'}"
    migrate.upgrade(url)
    key = "bench-serve"
    sae = TopKSAE(768, d_sae, k, use_b_dec=False)
    save_sae(sae, data_dir / "saes" / key / "sae", {"layer": 10, "tokens": "cls", "model": "ViT-B-32"})
    cfg = parse_config({"name": "bench", "model": ModelConfig(pretrained="none").model_dump(mode="json"), "sae": {"d_sae": d_sae, "k": k}})
    rng = np.random.default_rng(0)
    cache = ActivationCache.create_or_open(
        data_dir / "activations", {"dataset": {"dataset": "bench"}, "split": "train", "layer": 10, "tokens": "cls"}, n_images, 1, 768, np.arange(n_images))
    out = cache.writer()  # the precompute's inputs, which an image's page encodes
    out.write(rng.standard_normal((n_images, 1, 768), dtype=np.float32).astype(np.float16), np.zeros(n_images, dtype=np.int64))
    out.commit()
    with session_scope(url) as s:
        row = Sae(key=key, name="bench", status=SaeStatus.READY, model="ViT-B-32", pretrained="none", random_weights=True,
                  layer=10, tokens="cls", d_in=768, d_sae=d_sae, k=k, recipe="topk", config=cfg.model_dump(mode="json"), provenance={}, metrics={},
                  precompute={"cache": cache.path.name, "images": "bench"})
        s.add(row)
        s.flush()
        images = []
        for i in range(n_images):
            img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64))
            digest, rel = ensure_thumbnail(data_dir, img, 64)
            images.append({"dataset": "synthetic", "split": "train", "dataset_key": "bench", "index": i, "label": 0, "class_name": "x",
                           "content_hash": digest, "width": 64, "height": 64, "thumbnail": rel})
        s.execute(insert(ImageRow), images)
        image_ids = [r[0] for r in s.execute(ImageRow.__table__.select().with_only_columns(ImageRow.id)).all()]
        feats, examples = [], []
        for f in range(d_sae):
            m = float(rng.uniform(1, 10))
            feats.append({"sae_id": row.id, "idx": f, "n_active": 100, "frequency": float(rng.uniform(0, 0.05)), "mean_active": m / 3,
                          "max_activation": m, "is_dead": False, "is_dense": False,
                          "histogram": {"edges": list(np.geomspace(m / 1000, m, 25)), "counts": [4] * 24, "below": 0},
                          "intervals": [{"lo": i * m / 5, "hi": (i + 1) * m / 5, "count": 20, "share": 0.2} for i in range(5)],
                          "neighbours": [[int(n), 0.1, f"concept {int(n) % 600}"] for n in rng.integers(0, d_sae, 10)],
                          "classes": [{"label": c, "name": f"class {c}", "count": 20 - 3 * j, "share": (20 - 3 * j) / 100,
                                       "of_class": (20 - 3 * j) / 750, "mean": m / 3} for j, c in enumerate(rng.integers(0, 101, 5).tolist())],
                          "top_class": f"class {int(rng.integers(0, 101))}", "top_class_share": 0.2,
                          "auto_name": f"concept {f % 600}", "auto_score": 0.04, "coherence": float(rng.uniform(0, 0.4)),
                          "auto_names": [{"name": f"concept {(f + j) % 600}", "score": 0.04 - 0.01 * j} for j in range(3)]})
            for rank in range(12):
                examples.append({"sae_id": row.id, "feature": f, "bucket": -1, "rank": rank, "image_id": image_ids[int(rng.integers(len(image_ids)))],
                                 "activation": m * (1 - rank / 20)})
        s.execute(insert(Feature), feats)
        for start in range(0, len(examples), 50_000):
            s.execute(insert(FeatureExample), examples[start : start + 50_000])
        other = Sae(key="bench-other", name="other", status=SaeStatus.READY, model="ViT-B-32", pretrained="none", random_weights=True,
                    layer=10, tokens="cls", d_in=768, d_sae=d_sae, k=k, recipe="topk", config=cfg.model_dump(mode="json"), provenance={},
                    metrics={})
        s.add(other)  # a second SAE at the same site, without feature rows: what a feature page's matches read
        analyze(s, ImageRow.__table__, Feature.__table__, FeatureExample.__table__)  # PostgreSQL: as the precompute leaves them
    save_sae(TopKSAE(768, d_sae, k, use_b_dec=False), data_dir / "saes" / "bench-other" / "sae", {"layer": 10, "tokens": "cls", "model": "ViT-B-32"})
    return key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(data_dir: Path, database_url: str | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """A ``clipscope serve`` process over ``data_dir`` (and ``database_url``), once it answers: ``(process, base URL)``."""
    env = {**os.environ, "CLIPSCOPE_DATA_DIR": str(data_dir), "CLIPSCOPE_DEVICE": "cpu",
           **({"CLIPSCOPE_DATABASE_URL": database_url} if database_url else {})}
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "clipscope"), "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"clipscope serve did not answer at {base} within 30 s")
        yield server, base
    finally:
        server.terminate()
        server.wait(timeout=30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, quiet: float = 0.05, every: float = 0.5, limit: float = 60) -> float:
    """Seconds until a server's work in the background is done (after its start: torch's import; after a
    first list page: the list's kept rows), read as under ``quiet`` CPU seconds in ``every`` seconds."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        before = cpu_seconds(pid)
        time.sleep(every)
        if cpu_seconds(pid) - before < quiet:
            break
    return time.perf_counter() - started


def memory_gb(pid: int) -> dict[str, float]:
    """A process's resident memory now and its peak so far, in GB (Linux ``/proc``)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]) / 1e6, "peak": int(fields["VmHWM"].split()[0]) / 1e6}


def load(client: httpx.Client, urls, seconds: float, concurrency: int, server_pid: int) -> dict:
    """Requests/s and latency quantiles under ``concurrency`` clients, and the server's CPU per request:
    steadier than requests/s on a shared machine, and the ratio that matters once the one server
    process is the bottleneck."""
    cpu_before = cpu_seconds(server_pid)
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []

    def worker(seed: int) -> list[float]:
        rnd, out = random.Random(seed), []
        while time.perf_counter() < deadline and len(out) < 100_000:
            url = urls(rnd)
            t = time.perf_counter()
            r = client.get(url)
            out.append(time.perf_counter() - t)
            assert r.status_code == 200, (url, r.status_code)
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for result in pool.map(worker, range(concurrency)):
            latencies += result
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98],
            "server_cpu_ms_per_request": 1000 * (cpu_seconds(server_pid) - cpu_before) / len(latencies)}


CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def jpeg_512(seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((512, 512)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-sae", type=int, default=49_152)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--analyze-requests", type=int, default=20)
    a = parser.parse_args()
    data_dir = scratch_dir("clipscope-bench-serve-") / "data"
    t = time.perf_counter()
    key = build_database(data_dir, a.d_sae, 500, 5000)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    with running_server(data_dir) as (server, base):
        start_s = time.perf_counter() - t  # torch and open_clip are imported after it, in the background
        memory = {"started": memory_gb(server.pid)}
        with httpx.Client(base_url=base, timeout=60, limits=httpx.Limits(max_connections=a.concurrency * 2)) as client:
            feature = lambda r: f"/saes/{key}/features/{r.randrange(a.d_sae)}"  # noqa: E731
            listing = lambda r: f"/saes/{key}/features?page={r.randrange(1, a.d_sae // 50)}&sort=frequency&order=desc"  # noqa: E731
            for name, fn in (("feature_page", feature), ("feature_list", listing)):  # each page's reference: a file of its size
                (data_dir / "thumbnails" / f"{name}.html").write_bytes(b"x" * len(client.get(fn(random.Random(0))).content))
            settled_s = settle(server.pid)  # the loads measure serving, not the start's work left to the background
            results = {}
            for name, fn in (("feature_page", feature), ("feature_list", listing)):
                results[f"static_{name}_size"] = load(client, lambda r, name=name: f"/thumbnails/{name}.html", a.seconds, a.concurrency, server.pid)
                results[name] = load(client, fn, a.seconds, a.concurrency, server.pid)
            memory["after_the_page_loads"] = memory_gb(server.pid)
            t = time.perf_counter()
            assert client.get(f"/api/saes/{key}/features/0/matches").status_code == 200  # reads both SAEs' atoms
            matches_first = time.perf_counter() - t
            matched = []
            for i in range(1, 41):
                t = time.perf_counter()
                assert client.get(f"/api/saes/{key}/features/{i}/matches").status_code == 200
                matched.append(time.perf_counter() - t)
            jpeg = jpeg_512()
            post = lambda params=None: client.post(f"/api/saes/{key}/analyze", params=params, files={"file": ("x.jpg", jpeg, "image/jpeg")})  # noqa: E731
            t = time.perf_counter()
            assert post().status_code == 200  # loads CLIP and the SAE
            analyze_first = time.perf_counter() - t
            lat = []
            for _ in range(a.analyze_requests):
                t = time.perf_counter()
                assert post().status_code == 200
                lat.append(time.perf_counter() - t)
            explain = {"explain": "true", "classes": ",".join(CIFAR10)}
            t = time.perf_counter()
            assert post(explain).status_code == 200  # encodes the ten classes' prompts once
            explain_first = time.perf_counter() - t
            explained = []
            for _ in range(max(3, a.analyze_requests // 4)):
                t = time.perf_counter()
                assert post(explain).status_code == 200
                explained.append(time.perf_counter() - t)
            steered = []
            for _ in range(max(3, a.analyze_requests // 4)):  # the same ten classes, already encoded
                t = time.perf_counter()
                assert post({"edits": "0=0, 1*3, 2=5", "classes": explain["classes"]}).status_code == 200
                steered.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert client.get(f"/saes/{key}/images/1").status_code == 200  # opens the activation cache (the SAE is the analysis')
            image_first = time.perf_counter() - t
            imaged = []
            for i in range(2, 2 + a.analyze_requests):
                t = time.perf_counter()
                assert client.get(f"/saes/{key}/images/{i}").status_code == 200
                imaged.append(time.perf_counter() - t)
            image_set = [("files", (f"{i}.jpg", jpeg_512(i), "image/jpeg")) for i in range(8)]
            set_times = []
            for _ in range(3):
                t = time.perf_counter()
                assert client.post(f"/api/saes/{key}/analyze-set", files=image_set).status_code == 200
                set_times.append(time.perf_counter() - t)
            started = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(lambda _: post().status_code, range(32)))
            concurrent_s = time.perf_counter() - started
            memory["at_the_end"] = memory_gb(server.pid)  # CLIP and the SAE loaded, both SAEs' atoms kept for the matches
    print(json.dumps({
        "setup": f"{a.d_sae} features x 12 examples in SQLite (built in {build_s:.0f} s), one uvicorn worker, {a.concurrency} client threads, 2-core machine shared with the load generator",
        "server_start_s": start_s,
        "background_work_after_the_first_pages_s": settled_s,
        **results,
        "feature_page_over_static": results["feature_page"]["rps"] / results["static_feature_page_size"]["rps"],
        "feature_list_over_static": results["feature_list"]["rps"] / results["static_feature_list_size"]["rps"],
        "server_cpu_static_over_feature_page": results["static_feature_page_size"]["server_cpu_ms_per_request"] / results["feature_page"]["server_cpu_ms_per_request"],
        "server_cpu_static_over_feature_list": results["static_feature_list_size"]["server_cpu_ms_per_request"] / results["feature_list"]["server_cpu_ms_per_request"],
        "analyze_first_request_ms": 1000 * analyze_first,
        "analyze_512_jpeg_p50_ms": 1000 * statistics.median(lat),
        "analyze_8_concurrent_images_per_s": codes.count(200) / concurrent_s,
        "explain_first_request_ms": 1000 * explain_first,
        "explain_p50_ms": 1000 * statistics.median(explained),
        "explain_p50_over_analyze_p50": statistics.median(explained) / statistics.median(lat),
        "matches_first_request_ms": 1000 * matches_first,
        "matches_p50_ms": 1000 * statistics.median(matched),
        "steer_p50_ms": 1000 * statistics.median(steered),
        "steer_p50_over_analyze_p50": statistics.median(steered) / statistics.median(lat),
        "image_page_first_request_ms": 1000 * image_first,
        "image_page_p50_ms": 1000 * statistics.median(imaged),
        "image_page_p50_over_analyze_p50": statistics.median(imaged) / statistics.median(lat),
        "analyze_set_of_8_median_ms": 1000 * statistics.median(set_times),
        "analyze_set_of_8_over_8_analyze_p50": statistics.median(set_times) / (8 * statistics.median(lat)),
        "server_memory_gb": {**{f"{when}_rss": round(m["rss"], 2) for when, m in memory.items()}, "peak": round(memory["at_the_end"]["peak"], 2)},
    }, indent=2))


if __name__ == "__main__":
    main()
