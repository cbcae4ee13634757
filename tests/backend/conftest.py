"""A ready SAE built by the real pipeline (random CLIP, synthetic images), shared by the web tests."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from clipscope.config import parse_config
from clipscope.settings import Settings
from worker.context import Context
from worker.pipeline import run_all

TINY = {
    "name": "web",
    "model": {"pretrained": "none", "layer": 10},
    "data": {"name": "synthetic", "synthetic_size": 40, "image_size": 64},
    "extract": {"batch_size": 20},
    "sae": {"d_sae": 64, "k": 8},
    "train": {"epochs": 3, "batch_size": 8, "holdout_fraction": 0.2, "log_every": 2, "eval_every": 4},
    "evaluate": {"batch_size": 10, "templates": ["a photo of a {}."], "datasets": [{"name": "synthetic", "split": "test", "synthetic_size": 10, "image_size": 64}]},
    "precompute": {
        "top_k": 6, "intervals": 2, "per_interval": 2, "neighbours": 3, "thumbnail_size": 32,
        "names": {"vocabulary": ["stripes", "grass", "a circle", "a square", "something red"], "templates": ["a photo of {}."], "batch_size": 16},
    },
}


@pytest.fixture(scope="session")
def web_data(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("web") / "data"
    settings = Settings(data_dir=data_dir, device="cpu", num_workers=0, progress=False, allow_downloads=False)
    trained = run_all(Context(settings), parse_config(TINY))
    return settings, trained.sae_key


@pytest.fixture(scope="session")
def patch_web_data(tmp_path_factory):
    """Like ``web_data``, for an SAE over the 49 patch tokens: its top examples keep token maps."""
    data_dir = tmp_path_factory.mktemp("patch-web") / "data"
    settings = Settings(data_dir=data_dir, device="cpu", num_workers=0, progress=False, allow_downloads=False)
    config = {**TINY, "name": "patches", "model": {**TINY["model"], "tokens": "patches"}}
    trained = run_all(Context(settings), parse_config(config))
    return settings, trained.sae_key


def copy_database(settings, dst) -> str:
    """A consistent copy (WAL included) of the ready SQLite database; returns its URL."""
    import sqlite3

    with sqlite3.connect(settings.data_dir / "clipscope.db") as src, sqlite3.connect(dst) as out:
        src.backup(out)
    return f"sqlite:///{dst}"


def private_app(web_data, tmp_path, **overrides):
    """The explorer over a private copy of the ready database (labels never leak between tests)."""
    from backend.app import create_app

    settings, _ = web_data
    url = copy_database(settings, tmp_path / "clipscope.db")
    return create_app(settings.model_copy(update={"database_url": url, **overrides}))


@pytest.fixture
def web(web_data, tmp_path):
    key = web_data[1]
    app = private_app(web_data, tmp_path)
    with TestClient(app) as client:
        yield client, key


def with_token(client, **data) -> dict:
    """Form data plus the CSRF token of this client's cookie (fetched by a first GET when needed)."""
    if "clipscope_csrf" not in client.cookies:
        client.get("/")
    return {**data, "csrf_token": client.cookies["clipscope_csrf"]}
