"""Shared fixtures: an isolated data dir per test, a small random-initialised CLIP, tiny caches, and a ready
SAE built by the real pipeline (random CLIP, synthetic images) that the web, worker and notebook tests share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clipscope.activation_cache import ActivationCache
from clipscope.config import ModelConfig, parse_config
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


@pytest.fixture(scope="session")
def two_saes(tmp_path_factory):
    """Two ready SAEs at one hook site over one image set: ``a`` as ``web_data``'s, precomputed over all 40
    images; ``b`` with 48 latents, precomputed over the first 20. Read-only: copy its data dir to change it."""
    data = tmp_path_factory.mktemp("two-saes") / "data"
    settings = Settings(data_dir=data, device="cpu", num_workers=0, progress=False, allow_downloads=False)
    b_images = {**TINY["data"], "limit": 20}
    configs = [{**TINY, "name": "a"}, {**TINY, "name": "b", "sae": {"d_sae": 48, "k": 8}, "precompute": {**TINY["precompute"], "data": b_images}}]
    keys = [run_all(Context(settings), parse_config(c)).sae_key for c in configs]
    return settings, keys


def copy_data_dir(src: Path, dst: Path) -> str:
    """A private copy of a data dir, its SQLite database copied consistently (WAL included); returns the copy's database URL."""
    import shutil
    import sqlite3

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("clipscope.db*"))
    with sqlite3.connect(src / "clipscope.db") as a, sqlite3.connect(dst / "clipscope.db") as b:
        a.backup(b)
    return f"sqlite:///{dst / 'clipscope.db'}"


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


def array_cache(root: Path, acts: np.ndarray, name: str = "planted", tokens: str = "cls", labels: np.ndarray | None = None) -> ActivationCache:
    """An activation cache holding ``acts [n, d]`` (one token per image) or ``[n, tokens, d]``, and class
    ``labels`` (default: all class 0), as extraction would write it."""
    acts = acts[:, None, :] if acts.ndim == 2 else acts
    n, t, d = acts.shape
    key = {"dataset": {"dataset": name}, "split": "train", "layer": 0, "tokens": tokens, "weights": {"source": "test"}}
    cache = ActivationCache.create_or_open(root, key, n, t, d, np.arange(n))
    writer = cache.writer()
    writer.write(acts.astype(np.float16), np.zeros(n, dtype=np.int64) if labels is None else labels.astype(np.int64))
    writer.commit()
    return cache


def _pg_binary(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL cluster on a Unix socket, started as a non-root user when run as root.

    Missing server binaries skip the PostgreSQL tests locally but fail them in CI (CI=true).
    """
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not initdb or not pg_ctl:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the PostgreSQL tests")
        pytest.skip(message)
    base = Path(tempfile.mkdtemp(prefix="clipscope-pg-", dir="/tmp"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "nobody", "nogroup" if _group_exists("nogroup") else "nobody")
        base.chmod(0o700)
        run_as = ["runuser", "-u", "nobody", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"
    subprocess.run(run_as + [initdb, "-D", str(data), "-A", "trust", "-U", "clipscope", "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
    opts = f"-k {base} -p {port} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
    subprocess.run(run_as + [pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://clipscope@/{{db}}?host={base}&port={port}"
    finally:
        subprocess.run(run_as + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, migrated, empty database on each engine."""
    from clipscope.db import migrate

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
        migrate.upgrade(url)
        return url
    return fresh_postgresql_database(request.getfixturevalue("postgres_server"))


def fresh_postgresql_database(server: str) -> str:
    """The URL of a new, migrated, empty database on ``postgres_server``'s cluster."""
    import uuid

    from sqlalchemy import create_engine, text

    from clipscope.db import migrate

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server.format(db="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = server.format(db=name)
    migrate.upgrade(url)
    return url


def autovacuum_off(url: str, *tables: str) -> None:
    """PostgreSQL: autovacuum leaves ``tables`` alone, so that only the code under test analyses them."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        for table in tables:
            conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
    engine.dispose()


def planner_statistics(url: str, table: str) -> tuple[float, bool]:
    """PostgreSQL: the rows the planner believes ``table`` holds, and whether it has column statistics for it.

    Both are catalog state, published by the commit that analysed. Not ``n_mod_since_analyze``: the
    rows a transaction wrote reach that counter after its commit, when its server process next flushes
    its counts (within about a second, or ten when idle), so it reads 0 at first and the rows later.
    """
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT reltuples FROM pg_class WHERE relname = :t"), {"t": table}).scalar_one()
        columns = conn.execute(text("SELECT count(*) FROM pg_stats WHERE tablename = :t"), {"t": table}).scalar_one()
    engine.dispose()
    return float(rows), columns > 0


@pytest.fixture
def db_ctx(tmp_path, db_url) -> Context:
    """A context whose database is ``db_url`` (SQLite or PostgreSQL)."""
    return Context(
        Settings(data_dir=tmp_path / "data", database_url=db_url, device="cpu", num_workers=0, progress=False, allow_downloads=False)
    )


collect_ignore = [] if torch.cuda.is_available() else ["cuda"]
"""``tests/cuda`` is collected only where CUDA is (``scripts/gpu-check.sh`` runs it on a lent GPU):
elsewhere its tests could only be skipped, and CI counts a skip as a failure (below)."""

_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """In CI (CI=true) a skipped test is a failure: the PostgreSQL and browser tests must run there."""
    import os

    if os.environ.get("CI") and _skipped and session.exitstatus == 0:
        session.config.get_terminal_writer().line(f"CI: {len(_skipped)} test(s) skipped, which CI does not allow: {_skipped}", red=True)
        session.exitstatus = 1
