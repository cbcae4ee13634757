"""Batches of preprocessed images for the CLIP stages, and the autocast they run under."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader, Dataset

from clipscope.clip.preprocess import ImagePreprocess


class PreprocessedImages(Dataset):
    """Decodes images and does the host's part of their preprocessing (in DataLoader workers), from position ``start`` on."""

    def __init__(self, dataset, preprocess: ImagePreprocess, start: int = 0):
        self.dataset, self.preprocess, self.start = dataset, preprocess, start

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, j: int):
        image, label = self.dataset[self.start + j]
        return self.preprocess.host(image), label


def image_loader(dataset, preprocess: ImagePreprocess, batch_size: int, num_workers: int, device: str, start: int = 0) -> DataLoader:
    """In-order batches of ``(images, labels [B])``; ``preprocess.to_device(images, device)`` makes the model input."""
    return DataLoader(
        PreprocessedImages(dataset, preprocess, start),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=preprocess.collate,
        pin_memory=device.startswith("cuda"),
    )


def autocast(device: str, precision: str):
    """Mixed precision on CUDA when asked for; fp32 everywhere else."""
    if precision == "fp32" or not device.startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
