"""Food-101, CIFAR-10 and CIFAR-100 through torchvision, downloaded into the data dir when possible."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from clipscope.errors import ClipScopeError

_NAMES = {"food101": "Food-101", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def _construct(name: str, root: Path, split: str, download: bool):
    from torchvision import datasets

    if name == "food101":
        return datasets.Food101(str(root), split=split, download=download)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    return cls(str(root), train=split == "train", download=download)


class TorchvisionSet:
    def __init__(self, name: str, dataset, root: Path, split: str):
        self.name, self.dataset, self.root, self.split = name, dataset, root, split
        self.classes = [c.replace("_", " ") for c in dataset.classes]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image, label = self.dataset[i]
        return image.convert("RGB"), int(label)

    def identity(self) -> dict[str, Any]:
        return {"dataset": self.name, "n": len(self.dataset)}


def load_torchvision(name: str, root: Path, split: str, allow_download: bool) -> TorchvisionSet:
    """Use the copy under ``root`` if present; otherwise download it there, or say where to put it."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        return TorchvisionSet(name, _construct(name, root, split, download=False), root, split)
    except RuntimeError:
        pass  # not present: torchvision says "Dataset not found"
    if not allow_download:
        raise ClipScopeError(
            f"{_NAMES[name]} is not under {root} and downloads are off (CLIPSCOPE_ALLOW_DOWNLOADS); "
            f"place torchvision's {_NAMES[name]} files there or point data.root at a copy."
        )
    try:
        return TorchvisionSet(name, _construct(name, root, split, download=True), root, split)
    except Exception as exc:  # URLError, OSError, checksum errors: all mean "could not fetch"
        raise ClipScopeError(
            f"{_NAMES[name]} is not under {root} and could not be downloaded ({type(exc).__name__}: {exc}); "
            f"download it on a machine with internet and copy torchvision's {_NAMES[name]} files to {root}, "
            "or set data.root to a folder holding them."
        ) from exc
