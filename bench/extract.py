"""Extraction throughput: end-to-end images/s (JPEG decode, resize, CLIP forward to the hooked block,
fp16 write to the cache) against the forward pass alone on the same number of already preprocessed
batches. ``--copies`` hard-links each generated JPEG that many times, so a GPU gets enough images
to amortise the workers' start without generating them all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipscope.clip.hooks import residual_at  # noqa: E402
from clipscope.clip.loading import load_clip  # noqa: E402
from clipscope.clip.preprocess import ImagePreprocess, build_transform, preprocess_descriptor  # noqa: E402
from clipscope.config import DatasetSpec, ExtractConfig, ModelConfig  # noqa: E402
from clipscope.settings import Settings  # noqa: E402
from worker.batches import autocast  # noqa: E402
from worker.context import Context  # noqa: E402
from clipscope.datasets import build_dataset  # noqa: E402
from worker.extract import extract  # noqa: E402
from device_waits import host_waits  # noqa: E402
from scratch import scratch_dir  # noqa: E402


def make_jpegs(folder: Path, n: int, size=(512, 384), copies: int = 1) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"c{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize(size, Image.Resampling.BILINEAR).save(path, quality=90)
        for c in range(1, copies):
            os.link(path, path.with_name(f"{i:06d}-{c}.jpg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512, help="distinct JPEGs generated")
    parser.add_argument("--copies", type=int, default=1, help="hard links per JPEG: the dataset holds images x copies")
    parser.add_argument("--resize", default="pil", choices=["pil", "torch"], help="model.resize: in the workers (PIL) or on the device")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = parser.parse_args()
    torch.manual_seed(0)
    work = scratch_dir("clipscope-bench-extract-")
    make_jpegs(work / "images", a.images, copies=a.copies)
    model = ModelConfig(pretrained="none", layer=10, tokens="cls", precision=a.precision, resize=a.resize)
    clip = load_clip(model, a.device)
    spec = DatasetSpec(name="imagefolder", root=work / "images")
    settings = Settings(data_dir=work / "data", device=a.device, num_workers=a.workers, progress=False)

    # reference: the forward pass alone over as many batches, preprocessed beforehand (not timed) from the
    # distinct images (the copies would give the same batches)
    dataset = build_dataset(spec, work)
    n_images = len(dataset)
    transform = build_transform(preprocess_descriptor(model.model_copy(update={"resize": "pil"})))
    distinct = [dataset[j][0] for j in range(0, n_images, a.copies)]
    batches = [torch.stack([transform(img) for img in distinct[i : i + a.batch]]) for i in range(0, len(distinct), a.batch)]
    sizes = [min(a.batch, n_images - i) for i in range(0, n_images, a.batch)]
    with torch.inference_mode(), autocast(a.device, a.precision):
        residual_at(clip.visual, batches[0].to(a.device), 10)  # warm-up
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for i, size in enumerate(sizes):
            b = batches[i % len(batches)]
            b = b if len(b) == size else torch.cat([b] * -(-size // len(b)))[:size]
            residual_at(clip.visual, b.to(a.device), 10)[:, :1].to(torch.float16).cpu()
        forward_s = time.perf_counter() - started
    with torch.inference_mode():  # what mixed precision does to the hooked activations (CLS), same inputs as fp32
        first = batches[0].to(a.device)
        exact = residual_at(clip.visual, first, 10)[:, 0].float()
        with autocast(a.device, a.precision):
            mixed = residual_at(clip.visual, first, 10)[:, 0].float()
        precision_error = float(((mixed - exact).norm(dim=-1) / exact.norm(dim=-1)).max())

    # the workers' share: decoding plus the host's part of the preprocessing, one image at a time, one thread
    preprocess = ImagePreprocess(preprocess_descriptor(model))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sample = range(0, min(n_images, 64 * a.copies), a.copies)
    started = time.perf_counter()
    for j in sample:
        preprocess.host(dataset[j][0])
    host_ms = 1000 * (time.perf_counter() - started) / len(sample)
    torch.set_num_threads(threads)
    waits = None
    if preprocess.on_device and a.device.startswith("cuda"):  # the device's share must not make the host wait
        pixels = [preprocess.host(dataset[j][0]).pin_memory() for j in sample]
        with host_waits() as where:
            preprocess.to_device(pixels, a.device)
        waits = dict(where)

    started = time.perf_counter()
    extract(Context(settings), model, spec, ExtractConfig(batch_size=a.batch), clip=clip)
    e2e_s = time.perf_counter() - started
    print(json.dumps({
        "shape": f"{n_images} JPEGs 512x384 ({a.images} distinct), batch {a.batch}, {a.workers} decode workers, {a.precision}, "
                 f"resize {a.resize}, {a.device}, {torch.get_num_threads()} threads",
        "forward_only_images_per_s": n_images / forward_s,
        "end_to_end_images_per_s": n_images / e2e_s,
        "end_to_end_over_forward": forward_s / e2e_s,
        "activation_relative_error_vs_fp32": precision_error,
        "worker_ms_per_image": host_ms,
        "workers_images_per_s_at_most": a.workers * 1000 / host_ms,
        "host_waits_in_device_preprocessing": waits,
    }, indent=2))


if __name__ == "__main__":
    main()
