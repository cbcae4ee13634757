"""Activation caches: fp16 arrays on disk, memory-mapped, in a folder named by a hash of their inputs.

Layout of ``<data_dir>/activations/<name>-<hash>/``:

* ``metadata.json`` - the key (everything that determines the contents), shapes, progress
  (``n_done``) and ``complete``; rewritten atomically after the arrays are flushed, so the
  recorded progress never runs ahead of the data;
* ``activations.npy`` - ``float16 [n_images, tokens_per_image, d]``;
* ``labels.npy`` - ``int64 [n_images]`` class index (-1 = none);
* ``indices.npy`` - ``int64 [n_images]`` index of each image in its dataset.

A partial cache resumes at ``n_done``; a complete one is reused as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipscope.config import stable_hash
from clipscope.errors import ClipScopeError
from clipscope.storage import atomic_write_json, read_json

FORMAT_VERSION = 1


def cache_dir_for(root: Path, key: dict[str, Any]) -> Path:
    label = f"{key['dataset'].get('dataset', 'data')}-{key['split']}-L{key['layer']}-{key['tokens']}"
    return root / f"{label}-{stable_hash({**key, 'format': FORMAT_VERSION})}"


@dataclass
class ActivationCache:
    path: Path
    meta: dict[str, Any]

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    @property
    def n_done(self) -> int:
        return int(self.meta["n_done"])

    @property
    def n_images(self) -> int:
        return int(self.meta["n_images"])

    @property
    def tokens_per_image(self) -> int:
        return int(self.meta["tokens_per_image"])

    @property
    def d(self) -> int:
        return int(self.meta["d"])

    @classmethod
    def create_or_open(
        cls, root: Path, key: dict[str, Any], n_images: int, tokens_per_image: int, d: int, indices: np.ndarray
    ) -> "ActivationCache":
        """Open the cache for ``key`` (complete or partial), or lay out a new, empty one."""
        path = cache_dir_for(root, key)
        if (path / "metadata.json").exists():
            cache = cls.open(path)
            if cache.meta["key"] != _jsonable(key):
                raise ClipScopeError(f"Activation cache {path} holds a different key; delete it to rebuild.")
            return cache
        path.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(path / "activations.npy", mode="w+", dtype=np.float16, shape=(n_images, tokens_per_image, d)).flush()
        np.lib.format.open_memmap(path / "labels.npy", mode="w+", dtype=np.int64, shape=(n_images,)).flush()
        np.save(path / "indices.npy", np.asarray(indices, dtype=np.int64))
        meta = {
            "format": FORMAT_VERSION,
            "key": _jsonable(key),
            "n_images": n_images,
            "tokens_per_image": tokens_per_image,
            "d": d,
            "dtype": "float16",
            "n_done": 0,
            "complete": False,
        }
        atomic_write_json(path / "metadata.json", meta)
        return cls(path, meta)

    @classmethod
    def open(cls, path: Path) -> "ActivationCache":
        meta_path = Path(path) / "metadata.json"
        if not meta_path.is_file():
            raise ClipScopeError(f"{path} is not an activation cache (no metadata.json).")
        return cls(Path(path), read_json(meta_path))

    def writer(self) -> "CacheWriter":
        return CacheWriter(self)

    def activations(self) -> np.ndarray:
        """Read-only memory map ``[n_images, tokens_per_image, d]`` (rows past ``n_done`` are not yet valid)."""
        return np.load(self.path / "activations.npy", mmap_mode="r")

    def labels(self) -> np.ndarray:
        return np.load(self.path / "labels.npy", mmap_mode="r")

    def indices(self) -> np.ndarray:
        return np.load(self.path / "indices.npy")

    def require_complete(self) -> "ActivationCache":
        if not self.complete:
            raise ClipScopeError(f"Activation cache {self.path} is incomplete ({self.n_done}/{self.n_images}); run extract.")
        return self


class CacheWriter:
    """Appends rows in order; ``commit`` makes everything written so far durable and resumable."""

    def __init__(self, cache: ActivationCache):
        self.cache = cache
        self.acts = np.load(cache.path / "activations.npy", mmap_mode="r+")
        self.labels = np.load(cache.path / "labels.npy", mmap_mode="r+")
        self.position = cache.n_done

    def write(self, acts: np.ndarray, labels: np.ndarray) -> None:
        end = self.position + len(acts)
        self.acts[self.position : end] = acts
        self.labels[self.position : end] = labels
        self.position = end

    def commit(self) -> None:
        self.acts.flush()
        self.labels.flush()
        meta = dict(self.cache.meta, n_done=self.position, complete=self.position == self.cache.n_images)
        atomic_write_json(self.cache.path / "metadata.json", meta)
        self.cache.meta = meta


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so keys compare equal to what metadata.json holds."""
    import json

    return json.loads(json.dumps(obj, sort_keys=True, default=str))
