"""Zero-shot evaluation with the per-class feature support (one backward pass per batch through the
blocks after the hook site) against the same evaluation without it, on the same generated images,
alternating the two so a noisy machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipscope.clip.loading import load_clip  # noqa: E402
from clipscope.config import parse_config  # noqa: E402
from clipscope.sae.model import TopKSAE  # noqa: E402
from clipscope.settings import Settings  # noqa: E402
from scratch import scratch_dir  # noqa: E402
from worker import evaluate as stage  # noqa: E402
from worker.context import Context  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=49_152)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = parser.parse_args()
    torch.manual_seed(0)
    cfg = parse_config({
        "name": "bench", "model": {"pretrained": "none", "layer": 10}, "sae": {"d_sae": a.d_sae, "k": a.k},
        "evaluate": {"batch_size": a.batch, "templates": ["a photo of a {}."],
                     "datasets": [{"name": "synthetic", "split": "test", "synthetic_size": a.images, "image_size": 224}]},
    })
    ctx = Context(Settings(data_dir=scratch_dir("clipscope-bench-evaluate-"), device=a.device, num_workers=0, progress=False))
    clip = load_clip(cfg.model, a.device)
    sae = TopKSAE(768, a.d_sae, a.k)
    sae.init_weights("tied")
    sae = sae.to(a.device)
    mean, spec = torch.zeros(1, 768, device=a.device), cfg.evaluate.datasets[0]
    stage.evaluate_dataset(ctx, cfg, clip, sae, mean, spec)  # warm-up: generates the images once
    with_support, without = [], []
    for _ in range(a.rounds):
        for tally, times in ((True, with_support), (False, without)):
            started = time.perf_counter()
            stage.evaluate_dataset(ctx, cfg, clip, sae, mean, spec, class_support=tally)
            times.append(time.perf_counter() - started)
    print(json.dumps({
        "run": f"{a.images} images of the synthetic set's 30 classes, batch {a.batch}, SAE {a.d_sae} x k={a.k}, {a.device}",
        "with_class_support_s": with_support, "without_s": without,
        "ratios": [w / o for w, o in zip(with_support, without)],
    }, indent=2))


if __name__ == "__main__":
    main()
