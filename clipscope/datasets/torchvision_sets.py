"""Food-101, CIFAR-10 and CIFAR-100 in torchvision's on-disk layout, downloaded there when possible.

Food-101 is read through ``torchvision.datasets.Food101``. CIFAR is read here from the pickled
batches torchvision extracts (``cifar-10-batches-py/``, ``cifar-100-python/``), so any copy in that
layout works, and torchvision is used only to fetch and extract the archive.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipscope.errors import ClipScopeError

_NAMES = {"food101": "Food-101", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "label_names", b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", b"fine_labels"),
}


class CifarFiles:
    """CIFAR-10/100 from torchvision's extracted pickles."""

    def __init__(self, name: str, root: Path, split: str):
        folder, train_files, test_files, meta_file, names_key, labels_key = _CIFAR[name]
        base = root / folder
        files = train_files if split == "train" else test_files
        if not all((base / f).is_file() for f in files + [meta_file]):
            raise FileNotFoundError(base)
        images, labels = [], []
        for f in files:
            with open(base / f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += list(batch[labels_key])
        with open(base / meta_file, "rb") as fh:
            meta = pickle.load(fh, encoding="latin1")
        self.name, self.split = name, split
        self.images = np.concatenate(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = [c.replace("_", " ") for c in meta[names_key]]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]), int(self.labels[i])

    def identity(self) -> dict[str, Any]:
        return {"dataset": self.name, "split": self.split, "n": len(self)}

    def where(self, i: int) -> str:
        return f"{self.name} image {i}"


class Food101Files:
    def __init__(self, root: Path, split: str, download: bool):
        from torchvision import datasets

        self.dataset = datasets.Food101(str(root), split=split, download=download)
        self.split = split
        self.classes = [c.replace("_", " ") for c in self.dataset.classes]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image, label = self.dataset[i]
        return image.convert("RGB"), int(label)

    def identity(self) -> dict[str, Any]:
        return {"dataset": "food101", "split": self.split, "n": len(self)}

    def where(self, i: int) -> str:
        files = getattr(self.dataset, "_image_files", None)  # torchvision's list of paths (not public API)
        return str(files[i]) if files is not None else f"food101 image {i}"


def _open(name: str, root: Path, split: str):
    if name == "food101":
        return Food101Files(root, split, download=False)
    return CifarFiles(name, root, split)


def _download(name: str, root: Path) -> None:
    from torchvision import datasets

    if name == "food101":
        datasets.Food101(str(root), download=True)
    else:
        (datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100)(str(root), download=True)


def load_torchvision(name: str, root: Path, split: str, allow_download: bool):
    """Use the copy under ``root`` if present; otherwise download it there, or say where to put it."""
    try:
        return _open(name, root, split)
    except (FileNotFoundError, RuntimeError):
        pass  # not there (torchvision says "Dataset not found")
    if not allow_download:
        raise ClipScopeError(
            f"{_NAMES[name]} is not under {root} and downloads are off (CLIPSCOPE_ALLOW_DOWNLOADS); "
            f"place torchvision's {_NAMES[name]} files there or point the dataset's root at a copy."
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        _download(name, root)
        return _open(name, root, split)
    except Exception as exc:  # URLError, OSError, checksum errors: all mean "could not fetch"
        raise ClipScopeError(
            f"{_NAMES[name]} is not under {root} and could not be downloaded ({type(exc).__name__}); "
            f"download it on a machine with internet, copy torchvision's {_NAMES[name]} files to {root}, "
            "or set the dataset's root to a folder holding them."
        ) from exc
