"""Precompute at the Food-101 size on synthetic activations: time and peak memory of the whole
streaming computation (both passes and the neighbours) against one plain top-k pass over the same
data (encode every batch, keep nothing). Each side runs in its own process so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_cache(root: Path, n: int, d: int, seed: int = 0):
    from clipscope.activation_cache import ActivationCache

    key = {"dataset": {"dataset": "bench"}, "split": "train", "layer": 10, "tokens": "cls", "n": n, "seed": seed, "classes": 101}
    cache = ActivationCache.create_or_open(root, key, n, 1, d, np.arange(n))
    if not cache.complete:
        rng = np.random.default_rng(seed)
        writer = cache.writer()
        for start in range(0, n, 8192):
            m = min(8192, n - start)
            writer.write((rng.normal(size=(m, 1, d)) + 0.5).astype(np.float16), rng.integers(0, 101, m))  # Food-101's classes
        writer.commit()
    return cache


def make_sae(d: int, d_sae: int, k: int, device: str):
    from clipscope.sae.model import TopKSAE

    sae = TopKSAE(d, d_sae, k, use_b_dec=False)
    sae.init_weights("tied", generator=torch.Generator().manual_seed(0))
    return sae.to(device).eval()


def _run(kind: str, cache_path: str, args: dict, out) -> None:
    from clipscope.activation_cache import ActivationCache
    from clipscope.config import PrecomputeConfig
    from worker.precompute.stage import compute

    torch.set_num_threads(args["threads"])
    cache = ActivationCache.open(Path(cache_path))
    sae = make_sae(cache.d, args["d_sae"], args["k"], args["device"])
    pc = PrecomputeConfig(batch_size=args["batch"])
    started = time.perf_counter()
    with torch.no_grad():
        if kind == "reference":
            acts = cache.activations()
            for start in range(0, cache.n_images, pc.batch_size):
                x = torch.from_numpy(np.asarray(acts[start : start + pc.batch_size], dtype=np.float32).reshape(-1, cache.d))
                sae.encode(x.to(args["device"]))
        else:
            with tempfile.TemporaryDirectory() as spill:
                compute(sae, cache, pc, Path(spill) / "spill", args["device"])
    on_gpu = args["device"].startswith("cuda")
    if on_gpu:
        torch.cuda.synchronize()  # the reference only queues its work: count it done
    seconds = time.perf_counter() - started
    out.put({"kind": kind, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             **({"peak_device_mb": torch.cuda.max_memory_allocated() / 2**20} if on_gpu else {})})


def measure(kind: str, cache_path: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run, args=(kind, cache_path, args, q))
    p.start()
    result = q.get()
    p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=75_750)
    parser.add_argument("--d-sae", type=int, default=49_152)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "clipscope-bench")
    a = parser.parse_args()
    cache = make_cache(a.workdir, a.images, 768)
    args = {"d_sae": a.d_sae, "k": a.k, "batch": a.batch, "device": a.device, "threads": a.threads}
    ref = measure("reference", str(cache.path), args)
    ours = measure("precompute", str(cache.path), args)
    report = {
        "shape": f"{a.images} images x {a.d_sae} features, k={a.k}, batch {a.batch}, {a.device}, {a.threads} threads",
        "reference_plain_topk": ref,
        "precompute": ours,
        "time_ratio": ours["seconds"] / ref["seconds"],
        "peak_memory_ratio": ours["peak_rss_mb"] / ref["peak_rss_mb"],
        **({"peak_device_memory_ratio": ours["peak_device_mb"] / ref["peak_device_mb"]} if "peak_device_mb" in ref else {}),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
