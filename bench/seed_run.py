"""The whole seed training run, timed: ``worker.train.loop.train`` with configs/seed.toml on synthetic
activations of the Food-101 shape (75,750 train x 768, 10,000 held out), the data resident on the
device, logging, held-out evaluation and checkpoints included.

The reference, measured in the same run: the same number of fused Adam steps over the parameters
the recipe trains, with gradients already in place — the memory traffic every exact Adam step pays,
the floor of any implementation. Prints both and their ratio.

On a GPU the defaults are the real run (17,760 steps). On the CPU use ``--images 6400 --epochs 1``
(100 steps) to check that it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.seed_run")
sys.path.insert(0, str(ROOT))

from clipscope.activation_cache import ActivationCache  # noqa: E402
from clipscope.config import load_config  # noqa: E402
from clipscope.sae.io import load_sae  # noqa: E402
from clipscope import gemm  # noqa: E402
from clipscope.settings import Settings  # noqa: E402
from worker.context import Context  # noqa: E402
from worker.train.loop import train  # noqa: E402
from worker.train.step import adam  # noqa: E402
from device_waits import host_waits  # noqa: E402
from scratch import scratch_dir  # noqa: E402


def synthetic_cache(root: Path, name: str, n: int, d: int, seed: int) -> ActivationCache:
    """``n`` vectors of a few hundred sparse directions plus noise, written as extraction would (fp16, one token)."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(512, d)).astype(np.float32)
    key = {"dataset": {"dataset": name}, "split": "train", "layer": 10, "tokens": "cls", "weights": {"source": "bench"}}
    cache = ActivationCache.create_or_open(root, key, n, 1, d, np.arange(n))
    writer = cache.writer()
    for start in range(0, n, 8192):
        m = min(8192, n - start)
        coef = rng.exponential(size=(m, 512)).astype(np.float32) * (rng.random((m, 512)) < 0.05)
        acts = coef @ atoms / 4 + rng.normal(0, 0.3, size=(m, d)).astype(np.float32)
        writer.write(acts.astype(np.float16)[:, None, :], np.zeros(m, dtype=np.int64))
    writer.commit()
    return cache


def adam_floor(d: int, d_sae: int, steps: int, device: str) -> float:
    """Seconds for ``steps`` fused Adam steps over the seed recipe's trained parameters (encoder weight and bias)."""
    params = [torch.nn.Parameter(torch.zeros(d_sae, d, device=device)), torch.nn.Parameter(torch.zeros(d_sae, device=device))]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = adam(params, 1e-3)
    optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def host_syncs(work: Path, cfg, train_cache, eval_cache, device: str, steps: int, graphs: str) -> dict:
    """On a GPU: how often the real training loop waits for the device (CUDA's sync debug mode), over
    the first ``steps`` steps of a fresh run. Logging points and checkpoints read values back by
    design; anything near one wait per step would tie the host to the device."""
    settings = Settings(data_dir=work / f"sync-check-{graphs}", device=device, progress=False, cuda_graphs=graphs)
    with host_waits() as where:
        train(Context(settings), cfg, train_cache, eval_cache, stop_after=steps)
    return {"steps": steps, "waits_per_step": sum(where.values()) / steps, "where": dict(where.most_common(8))}


@torch.no_grad()
def relative_difference(sae, reference) -> float:
    """The largest weight difference, relative to the largest weight of the same tensor."""
    return max(
        float((getattr(sae, n) - getattr(reference, n)).abs().max() / getattr(reference, n).abs().max().clamp_min(1e-30))
        for n in ("W_enc", "b_enc", "W_dec", "b_dec")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=75_750, help="training vectors (Food-101 train: 75,750)")
    parser.add_argument("--eval-images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's (15)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "seed.toml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cuda-graphs", choices=["no", "yes", "both"], default="no",
                        help="the setting cuda_graphs; 'both' runs twice and compares the trained weights")
    a = parser.parse_args()
    cfg = load_config(a.config)
    if a.epochs is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": a.epochs})})
    work = scratch_dir("clipscope-bench-seed-run-")
    caches = Context(Settings(data_dir=work / "data", device=a.device, progress=False)).layout.activations
    d = 768
    train_cache = synthetic_cache(caches, "bench-train", a.images, d, 0)
    eval_cache = synthetic_cache(caches, "bench-eval", a.eval_images, d, 1)
    on_gpu = a.device.startswith("cuda")
    report, weights, steps, floor = {}, {}, "?", None
    for graphs in (["no", "yes"] if a.cuda_graphs == "both" else [a.cuda_graphs]):
        ctx = Context(Settings(data_dir=work / f"run-graphs-{graphs}", device=a.device, progress=False, cuda_graphs=graphs))
        started = time.perf_counter()
        try:
            result = train(ctx, cfg, train_cache, eval_cache)
        except Exception as exc:  # keep the other run's figures; the log holds the traceback
            log.exception("seed run with cuda_graphs=%s failed", graphs)
            report[f"cuda_graphs_{graphs}"] = {"error": repr(exc)}
            continue
        wall = time.perf_counter() - started
        steps = int(result.metrics["steps"])
        floor = floor or adam_floor(d, cfg.sae.d_sae, steps, a.device)  # the same for both runs: measured once
        weights[graphs] = load_sae(result.sae_dir)[0]
        report[f"cuda_graphs_{graphs}"] = {
            "training_loop_s": result.metrics["train_seconds"],
            "of_which_checkpoints_s": result.metrics["checkpoint_seconds"],  # snapshots, and waits for the disk
            "whole_call_s": wall,
            "adam_floor_s": floor,
            "loop_over_floor": result.metrics["train_seconds"] / floor,
            "heldout_evr": result.metrics["evr"],
            "l0": result.metrics["l0"],
            "host_waits": host_syncs(work, cfg, train_cache, eval_cache, a.device, min(steps, 300), graphs) if on_gpu else None,
        }
    if len(weights) == 2:  # the same arithmetic; atomics in scatter-adds make the sums differ in the last bits
        report["graphs_vs_eager_max_relative_weight_difference"] = relative_difference(weights["yes"], weights["no"])
    print(json.dumps({
        "run": f"{cfg.name}: {steps} steps of batch {cfg.train.batch_size}, d_sae {cfg.sae.d_sae}, k {cfg.sae.k}, {a.device}"
               f" ({torch.cuda.get_device_name() if on_gpu else f'{torch.get_num_threads()} threads, {gemm.cpu_kernel()}'})",
        **report,
    }, indent=2))


if __name__ == "__main__":
    main()
