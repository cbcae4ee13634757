"""CLIP ViT-B/32 on the CPU: its blocks with their products through oneDNN
(``clipscope/clip/cpu_blocks.py``, what ClipScope runs) against the same blocks run as open_clip's
modules (torch's own path: MKL's products, the fused attention kernel), alternately in the same
process on the same inputs. The image tower to block 10 at batch 1 (an analysed upload) and at
extraction's batches; the rest of it from block 10 (where ClipScope's last block computes the CLS
token alone) for 24 streams, as an explanation measures its features; the text tower building a zero-shot classifier (CLIP's 18 CIFAR templates
per class, as an explained prediction's first request or the evaluation does). Prints ms per
call, the ratio, and the largest difference between the two outputs.
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

from clipscope import gemm  # noqa: E402
from clipscope.clip import cpu_blocks  # noqa: E402
from clipscope.clip.hooks import continue_from, residual_at  # noqa: E402
from clipscope.clip.loading import load_clip  # noqa: E402
from clipscope.clip.zeroshot import CLIP_CIFAR_TEMPLATES, build_classifier  # noqa: E402
from clipscope.config import ModelConfig  # noqa: E402


def compare(run, rounds: int, seconds: float) -> dict[str, float]:
    """Times ``run()`` with the blocks as modules and through :mod:`cpu_blocks`, alternately."""
    rules = ("applies", "first_token_applies")
    ours = {rule: getattr(cpu_blocks, rule) for rule in rules}
    sides = {"module": {rule: lambda block, x: False for rule in rules}, "clipscope": ours}

    def take(side: str) -> None:
        for rule, fn in sides[side].items():
            setattr(cpu_blocks, rule, fn)

    try:
        outputs, first = {}, {}
        for name in sides:
            take(name)
            started = time.perf_counter()
            outputs[name] = run()  # also the warm-up
            first[name] = time.perf_counter() - started
        repeats = max(1, round(seconds / max(first.values())))
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(rounds):
            for name in sides:
                take(name)
                started = time.perf_counter()
                for _ in range(repeats):
                    run()
                times[name].append((time.perf_counter() - started) / repeats)
    finally:
        take("clipscope")
    module, ours = statistics.median(times["module"]), statistics.median(times["clipscope"])
    return {"module_ms": module * 1e3, "clipscope_ms": ours * 1e3, "speedup": module / ours,
            "max_abs_difference": (outputs["module"] - outputs["clipscope"]).abs().max().item(),
            "output_max_abs": outputs["module"].abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="image batches")
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--rest", type=int, default=24, help="streams run from the hook site to the embedding (0: none)")
    parser.add_argument("--classes", type=int, default=10, help="classes of the zero-shot classifier (0: none)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    parser.add_argument("--seconds", type=float, default=2.0, help="about how long each side runs per round")
    a = parser.parse_args()
    clip = load_clip(ModelConfig(pretrained="none"), "cpu")
    results = {}
    with torch.inference_mode():
        for batch in a.batches:
            images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
            row = compare(lambda: residual_at(clip.visual, images, a.layer), a.rounds, a.seconds)
            results[f"image_batch_{batch}"] = {**row, "clipscope_images_per_s": batch / row["clipscope_ms"] * 1e3}
        if a.rest:  # the tower after the hook site, as an explanation runs it for the features it measures
            stream = torch.randn(a.rest, 50, 768, generator=torch.Generator().manual_seed(0))
            results[f"rest_of_tower_batch_{a.rest}"] = compare(lambda: continue_from(clip.visual, stream, a.layer), a.rounds, a.seconds)
        if a.classes:
            names = [f"class number {i}" for i in range(a.classes)]
            results[f"text_classifier_{a.classes}_classes"] = compare(
                lambda: build_classifier(clip.model, "ViT-B-32", names, CLIP_CIFAR_TEMPLATES, "cpu"), a.rounds, a.seconds)
    print(json.dumps({
        "shape": f"ViT-B-32 (random init), image tower to block {a.layer}, CPU, {torch.get_num_threads()} threads, kernel {gemm.cpu_kernel()}",
        **results,
    }, indent=2))


if __name__ == "__main__":
    main()
