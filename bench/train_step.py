"""Training-step throughput: ClipScope's sparse TopK SAE step against a straightforward dense PyTorch
implementation of the same maths (dense code and decoder, autograd everywhere, default Adam),
measured alternately in the same process on the same data. Prints steps/s and the ratio.

Measured in the same rounds: the encoder's dense product alone (``[batch, 768] x [768, d_sae]`` in
fp32, what every exact step computes to find its top k), and the reference over it, the ratio that
no step computing that product can exceed (``ceiling_for_an_exact_encoder_product``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipscope.config import TrainConfig  # noqa: E402
from clipscope import gemm  # noqa: E402
from clipscope.sae.dense_reference import DenseTopKSAE  # noqa: E402
from clipscope.sae.metrics import FiringTracker  # noqa: E402
from clipscope.sae.model import TopKSAE  # noqa: E402
from clipscope.sae.sparse_ops import encoder_chunks  # noqa: E402
from worker.train.graphed import GraphedStep  # noqa: E402
from worker.train.step import adam, train_step  # noqa: E402
from worker.train.recipes import make_recipe  # noqa: E402
from device_waits import host_waits  # noqa: E402


def build(kind: str, recipe_name: str, d: int, d_sae: int, k: int, device: str, dead_fraction: float):
    """``kind``: "dense" (the reference), "sparse" (ClipScope's step) or "graphed" (ClipScope's step as a CUDA graph)."""
    cls = DenseTopKSAE if kind == "dense" else TopKSAE
    sae = cls(d, d_sae, k, use_b_dec=recipe_name == "topk").to(device)
    recipe = make_recipe(TrainConfig(recipe=recipe_name), 17_760, d, d_sae)
    recipe.initialise(sae, torch.randn(256, d, device=device))
    recipe.prepare(sae)
    params = recipe.parameters(sae)
    optimizer = torch.optim.Adam(params, lr=recipe.base_lr) if kind == "dense" else adam(params, recipe.base_lr, capturable=kind == "graphed")
    tracker = FiringTracker(d_sae, dead_after=10_000_000, device=device)
    if dead_fraction > 0:  # a mid-training state: these latents never fire, so AuxK does its real work
        dead = torch.arange(0, d_sae, round(1 / dead_fraction), device=device)
        with torch.no_grad():
            sae.b_enc[dead] = -1e3
        tracker.since_fired[dead] = tracker.dead_after
    return sae, recipe, optimizer, tracker


def encoder_product(sae: TopKSAE):
    """``run(x, step)``: the encoder's dense product alone, taken as ClipScope's step takes it (on the
    CPU by chunks of rows, each discarded while in cache)."""
    @torch.no_grad()
    def run(x: torch.Tensor, step: int) -> None:
        for rows in encoder_chunks(x):
            sae.pre_activations(rows)
    return run


def stepper(kind: str, parts, batch: int):
    """``run(x, step)``: one training step of that side, or for "product" the encoder's product alone."""
    if kind == "product":
        return encoder_product(parts[0])
    if kind == "graphed":
        graphed = GraphedStep(*parts, batch_size=batch)
        return lambda x, step: graphed(x, step, parts[1].base_lr)
    return lambda x, step: train_step(*parts, x, step, parts[1].base_lr)


def time_steps(run, xs, first_step: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for i, x in enumerate(xs):
        run(x, first_step + i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / len(xs)


def host_syncs(run, xs, first_step: int) -> list[str]:
    """On a GPU, the distinct lines where ClipScope's steps wait for the device (CUDA's sync debug mode);
    the tests check the same on the meta device, this confirms it on the real one."""
    with host_waits() as where:
        for i, x in enumerate(xs):
            run(x, first_step + i)
    return sorted(where)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", choices=["seed", "topk"], default="seed")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--d-sae", type=int, default=49_152)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    parser.add_argument("--dead-fraction", type=float, default=0.1, help="share of latents made dead (AuxK's input)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = parser.parse_args()
    d = 768
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(a.batch, d, generator=g).to(a.device) for _ in range(a.steps)]
    on_gpu = a.device.startswith("cuda")
    kinds = ("dense", "sparse", "graphed") if on_gpu else ("dense", "sparse")  # graphs need CUDA
    parts = {kind: build(kind, a.recipe, d, a.d_sae, a.k, a.device, a.dead_fraction) for kind in kinds}
    runs = {kind: stepper(kind, parts[kind], a.batch) for kind in kinds}
    runs["product"] = stepper("product", parts["sparse"], a.batch)
    for run in runs.values():
        time_steps(run, xs[:2], 0, a.device)  # warm-up (a graph is captured at its second step)
    times: dict[str, list[float]] = {kind: [] for kind in runs}
    for r in range(a.rounds):
        for kind, run in runs.items():
            times[kind].append(time_steps(run, xs, 2 + r * a.steps, a.device))
    dense, sparse, product = (statistics.median(times[kind]) for kind in ("dense", "sparse", "product"))
    graphed = statistics.median(times["graphed"]) if on_gpu else None
    syncs = host_syncs(runs["sparse"], xs[:3], 2 + a.rounds * a.steps) if on_gpu else None
    print(json.dumps({
        "shape": f"d={d}, d_sae={a.d_sae}, k={a.k}, batch {a.batch}, recipe {a.recipe}, {a.dead_fraction:.0%} dead, {a.device}, {torch.get_num_threads()} threads",
        "clipscope_encoder_gemm": gemm.cpu_kernel() if a.device == "cpu" else "torch (F.linear)",
        "dense_reference_steps_per_s": 1 / dense,
        "clipscope_steps_per_s": 1 / sparse,
        "speedup": dense / sparse,
        "encoder_product_ms": 1000 * product,
        "ceiling_for_an_exact_encoder_product": dense / product,
        "seed_run_estimate_s": 17_760 * sparse,
        **({"clipscope_cuda_graph_steps_per_s": 1 / graphed, "cuda_graph_speedup": dense / graphed,
            "clipscope_host_syncs": syncs} if on_gpu else {}),
    }, indent=2))


if __name__ == "__main__":
    main()
