"""Extraction throughput: end-to-end images/s (JPEG decode, resize, CLIP forward to the hooked block,
fp16 write to the cache) against the forward pass alone on the same, already preprocessed batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipscope.clip.hooks import residual_at  # noqa: E402
from clipscope.clip.loading import load_clip  # noqa: E402
from clipscope.clip.preprocess import build_transform, preprocess_descriptor  # noqa: E402
from clipscope.config import DatasetSpec, ExtractConfig, ModelConfig  # noqa: E402
from clipscope.settings import Settings  # noqa: E402
from worker.batches import autocast  # noqa: E402
from worker.context import Context  # noqa: E402
from worker.datasets import build_dataset  # noqa: E402
from worker.extract import extract  # noqa: E402


def make_jpegs(folder: Path, n: int, size=(512, 384)) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"c{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize(size, Image.Resampling.BILINEAR).save(path, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="clipscope-bench-extract-"))
    make_jpegs(work / "images", a.images)
    model = ModelConfig(pretrained="none", layer=10, tokens="cls", precision=a.precision)
    clip = load_clip(model, a.device)
    spec = DatasetSpec(name="imagefolder", root=work / "images")
    settings = Settings(data_dir=work / "data", device=a.device, num_workers=a.workers, progress=False)

    # reference: the forward pass alone, on the same batches, preprocessed beforehand (not timed)
    dataset = build_dataset(spec, work)
    transform = build_transform(preprocess_descriptor(model))
    batches = [torch.stack([transform(dataset[j][0]) for j in range(i, min(i + a.batch, len(dataset)))]) for i in range(0, len(dataset), a.batch)]
    with torch.inference_mode(), autocast(a.device, a.precision):
        residual_at(clip.visual, batches[0].to(a.device), 10)  # warm-up
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for b in batches:
            residual_at(clip.visual, b.to(a.device), 10)[:, :1].to(torch.float16).cpu()
        forward_s = time.perf_counter() - started

    started = time.perf_counter()
    extract(Context(settings), model, spec, ExtractConfig(batch_size=a.batch), clip=clip)
    e2e_s = time.perf_counter() - started
    print(json.dumps({
        "shape": f"{a.images} JPEGs 512x384, batch {a.batch}, {a.workers} decode workers, {a.precision}, {a.device}, {torch.get_num_threads()} threads",
        "forward_only_images_per_s": a.images / forward_s,
        "end_to_end_images_per_s": a.images / e2e_s,
        "end_to_end_over_forward": forward_s / e2e_s,
    }, indent=2))


if __name__ == "__main__":
    main()
