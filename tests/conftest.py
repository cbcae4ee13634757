"""Shared fixtures: an isolated data dir per test, a small random-initialised CLIP, tiny caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clipscope.activation_cache import ActivationCache
from clipscope.config import ModelConfig
from clipscope.settings import Settings
from worker.context import Context


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the developer's .env or data dir."""
    for var in ("CLIPSCOPE_DATA_DIR", "CLIPSCOPE_DATABASE_URL", "CLIPSCOPE_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(2)


@pytest.fixture
def ctx(tmp_path) -> Context:
    return make_context(tmp_path / "data")


def make_context(data_dir: Path) -> Context:
    return Context(Settings(data_dir=data_dir, device="cpu", num_workers=0, progress=False, allow_downloads=False))


@pytest.fixture(scope="session")
def random_clip():
    from clipscope.clip.loading import load_clip

    return load_clip(ModelConfig(pretrained="none"), "cpu")


def array_cache(root: Path, acts: np.ndarray, name: str = "planted") -> ActivationCache:
    """An activation cache holding ``acts [n, d]`` (one token per image), as extraction would write it."""
    n, d = acts.shape
    key = {"dataset": {"dataset": name}, "split": "train", "layer": 0, "tokens": "cls", "weights": {"source": "test"}}
    cache = ActivationCache.create_or_open(root, key, n, 1, d, np.arange(n))
    writer = cache.writer()
    writer.write(acts.astype(np.float16)[:, None, :], np.zeros(n, dtype=np.int64))
    writer.commit()
    return cache
