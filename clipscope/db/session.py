"""Engines and sessions for SQLite (default) and PostgreSQL."""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from clipscope.errors import ClipScopeError


_SQLITE_MMAP_BYTES = 1 << 30


def check_url(url: str) -> None:
    """ClipScope's data lives in SQLite or PostgreSQL: any other URL is refused with the forms that work."""
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        backend = None
    if backend not in ("sqlite", "postgresql"):
        given = make_url(url).render_as_string() if backend else "a value that is not a URL"  # never a password
        raise ClipScopeError(
            f"CLIPSCOPE_DATABASE_URL must name a SQLite or PostgreSQL database (sqlite:///path/clipscope.db, "
            f"postgresql+psycopg://user:password@host/db), not {given}."
        )


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    check_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):
            cur = conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            # Read pages straight from the OS page cache (shared by every connection) instead of
            # copying them through SQLite's small per-connection cache: the explorer reads
            # scattered rows of a large file on every page.
            cur.execute(f"PRAGMA mmap_size={_SQLITE_MMAP_BYTES}")
            cur.close()

        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except ImportError as exc:
        raise ClipScopeError(f"The database driver of {make_url(url).drivername} is not installed ({exc}); use postgresql+psycopg://.") from None


@lru_cache(maxsize=8)
def _sessionmaker(url: str) -> sessionmaker:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session committed on success and rolled back on error: one transaction per block."""
    session = _sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
