"""The dataset interface, subset selection, and the factory that maps a spec to a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from clipscope.config import DatasetSpec, stable_hash
from clipscope.errors import ClipScopeError


class ImageDataset(Protocol):
    """Random access to ``(RGB image, class index)``; class index -1 means unlabelled."""

    classes: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...

    def identity(self) -> dict[str, Any]:
        """What determines the dataset's content, for cache names and image keys: the split too, where it
        chooses the images (two splits of one size must not share keys)."""
        ...

    def where(self, index: int) -> str:
        """Item ``index`` as a user finds it: its file, or the dataset and position."""
        ...


class Selection:
    """A spec's subset of a base dataset; item ``j`` is base item ``indices[j]``."""

    def __init__(self, base: ImageDataset, spec: DatasetSpec):
        self.base, self.spec = base, spec
        self.classes = base.classes
        self.indices = select_indices(len(base), spec)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[Image.Image, int]:
        return self.base[int(self.indices[j])]

    def where(self, j: int) -> str:
        return self.base.where(int(self.indices[j]))

    def image_key(self) -> str:
        """The key the database's image rows of this dataset are stored under: the base dataset's, so that
        every subset of it (and every SAE over one) shares its images."""
        return stable_hash(self.base.identity())

    def identity(self) -> dict[str, Any]:
        return {
            **self.base.identity(),
            "split": self.spec.split,
            "subsample": self.spec.subsample if self.spec.subsample is not None and self.spec.subsample < len(self.base) else None,
            "limit": self.spec.limit,
            "seed": self.spec.seed,
        }


def select_indices(n: int, spec: DatasetSpec) -> np.ndarray:
    """Seeded random ``subsample`` (kept in index order), then the first ``limit``."""
    indices = np.arange(n, dtype=np.int64)
    if spec.subsample is not None and spec.subsample < n:
        rng = np.random.default_rng(spec.seed)
        indices = np.sort(rng.choice(n, size=spec.subsample, replace=False))
    if spec.limit is not None:
        indices = indices[: spec.limit]
    if len(indices) == 0:
        raise ClipScopeError(f"Dataset {spec.name}/{spec.split} selects no images.")
    return indices


def build_dataset(spec: DatasetSpec, datasets_dir: Path, allow_download: bool = True) -> Selection:
    """The images a spec names; ``root`` defaults to ``datasets_dir / name``."""
    root = Path(spec.root).expanduser() if spec.root is not None else datasets_dir / spec.name
    if spec.name == "synthetic":
        from clipscope.datasets.synthetic import SyntheticShapes

        base: ImageDataset = SyntheticShapes(
            size=spec.synthetic_size, split=spec.split, seed=spec.seed, image_size=spec.image_size
        )
    elif spec.name == "imagefolder":
        from clipscope.datasets.imagefolder import ImageFolder

        base = ImageFolder(root)
    else:
        from clipscope.datasets.torchvision_sets import load_torchvision

        base = load_torchvision(spec.name, root, spec.split, allow_download)
    return Selection(base, spec)
