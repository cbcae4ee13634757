"""Activation caches: fp16 arrays on disk, memory-mapped, in a folder named by a hash of their inputs.

Layout of ``<data_dir>/activations/<name>-<hash>/``:

* ``metadata.json`` - the key (everything that determines the contents), shapes, progress
  (``n_done``) and ``complete``; rewritten atomically after the arrays are flushed, so the
  recorded progress never runs ahead of the data;
* ``activations.npy`` - ``float16 [n_images, tokens_per_image, d]``;
* ``labels.npy`` - ``int64 [n_images]`` class index (-1 = none);
* ``indices.npy`` - ``int64 [n_images]`` index of each image in its dataset;
* ``image_embeddings.npy`` - ``float16 [n_images, embed_dim]``, optional: each image's unit-norm CLIP
  image embedding (the whole tower), for automatic feature names. Written with the activations when
  the cache was laid out with ``embed_dim``, or added to a complete cache by :meth:`add_embeddings`;
  ``meta["embed_dim"]`` says it is there.

A partial cache resumes at ``n_done``; a complete one is reused as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipscope.config import stable_hash
from clipscope.errors import ClipScopeError
from clipscope.storage import atomic_write_json, read_json

if TYPE_CHECKING:
    from clipscope.db.models import Sae

FORMAT_VERSION = 1
EMBEDDINGS = "image_embeddings.npy"


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

    @property
    def has_embeddings(self) -> bool:
        return self.meta.get("embed_dim") is not None

    @classmethod
    def create_or_open(
        cls, root: Path, key: dict[str, Any], n_images: int, tokens_per_image: int, d: int, indices: np.ndarray,
        embed_dim: int | None = None,
    ) -> "ActivationCache":
        """Open the cache for ``key`` (complete or partial), or lay out a new, empty one (with image
        embeddings written alongside when ``embed_dim`` is given; an existing cache keeps its layout)."""
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
        if embed_dim is not None:
            np.lib.format.open_memmap(path / EMBEDDINGS, mode="w+", dtype=np.float16, shape=(n_images, embed_dim)).flush()
        meta = {
            "format": FORMAT_VERSION,
            "key": _jsonable(key),
            "n_images": n_images,
            "tokens_per_image": tokens_per_image,
            "d": d,
            "dtype": "float16",
            "n_done": 0,
            "complete": False,
            "embed_dim": embed_dim,
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

    def embeddings(self) -> np.ndarray | None:
        """Read-only memory map ``[n_images, embed_dim]`` of unit-norm image embeddings, or None without them."""
        return np.load(self.path / EMBEDDINGS, mmap_mode="r") if self.has_embeddings else None

    def add_embeddings(self, embeddings: np.ndarray) -> None:
        """Keep the image embeddings of a complete cache that was extracted without them."""
        self.require_complete()
        if embeddings.shape[0] != self.n_images:
            raise ValueError(f"{embeddings.shape[0]} embeddings for a cache of {self.n_images} images")
        tmp = self.path / "image_embeddings.tmp.npy"
        np.save(tmp, np.asarray(embeddings, dtype=np.float16))
        tmp.replace(self.path / EMBEDDINGS)
        self.meta = dict(self.meta, embed_dim=int(embeddings.shape[1]))
        atomic_write_json(self.path / "metadata.json", self.meta)

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
        self.embeddings = np.load(cache.path / EMBEDDINGS, mmap_mode="r+") if cache.has_embeddings else None
        self.position = cache.n_done

    def write(self, acts: np.ndarray, labels: np.ndarray, embeddings: np.ndarray | None = None) -> None:
        """Append rows; ``embeddings`` exactly when the cache keeps them."""
        if (embeddings is None) != (self.embeddings is None):
            raise ValueError("this cache keeps image embeddings: write them with the activations" if embeddings is None else "this cache keeps no image embeddings")
        end = self.position + len(acts)
        self.acts[self.position : end] = acts
        self.labels[self.position : end] = labels
        if embeddings is not None:
            self.embeddings[self.position : end] = embeddings
        self.position = end

    def commit(self) -> None:
        self.acts.flush()
        self.labels.flush()
        if self.embeddings is not None:
            self.embeddings.flush()
        meta = dict(self.cache.meta, n_done=self.position, complete=self.position == self.cache.n_images)
        atomic_write_json(self.cache.path / "metadata.json", meta)
        self.cache.meta = meta


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so keys compare equal to what metadata.json holds."""
    import json

    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def open_precompute_cache(data_dir: Path, sae: "Sae") -> ActivationCache:
    """The activation cache an SAE's precompute read, which a server or a notebook needs for what the database
    does not hold (which features fire on which image). Raises ClipScopeError, naming the folder and the way out, when this server lacks it."""
    name = (sae.precompute or {}).get("cache")
    path = Path(data_dir) / "activations" / str(name)
    if not name or not (path / "metadata.json").is_file():
        raise ClipScopeError(f"its precompute's activation cache is not on this server ({path}): copy the data dir's "
                             "activations/ folder with the database, or run `clipscope precompute` here.")
    return ActivationCache.open(path)
