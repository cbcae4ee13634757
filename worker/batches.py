"""Batches of preprocessed images for the CLIP stages, and the autocast they run under."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from clipscope.clip.preprocess import ImagePreprocess
from clipscope.errors import ClipScopeError


class Unreadable(NamedTuple):
    """An image a worker could not decode, handed to the main process as a value: raised in the worker,
    it would arrive as its type wrapped around the worker's whole traceback."""

    where: str
    reason: str


class PreprocessedImages(Dataset):
    """Decodes images and does the host's part of their preprocessing (in DataLoader workers), from position ``start`` on."""

    def __init__(self, dataset, preprocess: ImagePreprocess, start: int = 0):
        self.dataset, self.preprocess, self.start = dataset, preprocess, start

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, j: int):
        try:
            image, label = self.dataset[self.start + j]
        except Exception as exc:  # whatever the decoder raises about the file: PIL raises OSError, SyntaxError, ValueError...
            return Unreadable(self.dataset.where(self.start + j), f"{type(exc).__name__}: {exc}")
        return self.preprocess.host(image), label


def _collate(collate, items: list):
    """``collate(items)``, or the first unreadable image among them (the batch cannot be made)."""
    broken = next((item for item in items if isinstance(item, Unreadable)), None)
    return broken if broken is not None else collate(items)


class ImageBatches:
    """In-order batches of ``(images, labels [B])``; an image that cannot be read stops the stage with a
    ``ClipScopeError`` naming it, after the batches before it."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            if isinstance(batch, Unreadable):
                raise ClipScopeError(f"Cannot read {batch.where} ({batch.reason}); remove or repair it, then run again.")
            yield batch


def image_loader(dataset, preprocess: ImagePreprocess, batch_size: int, num_workers: int, device: str, start: int = 0) -> ImageBatches:
    """In-order batches of ``(images, labels [B])``; ``preprocess.to_device(images, device)`` makes the model input."""
    return ImageBatches(DataLoader(
        PreprocessedImages(dataset, preprocess, start),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=partial(_collate, preprocess.collate),
        pin_memory=device.startswith("cuda"),
    ))


def autocast(device: str, precision: str):
    """Mixed precision on CUDA when asked for; fp32 everywhere else."""
    if precision == "fp32" or not device.startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
