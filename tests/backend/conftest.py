"""The explorer over a private copy of the ready SAE that tests/conftest.py builds (``web_data``)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient


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
