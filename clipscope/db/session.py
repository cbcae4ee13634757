"""Engines and sessions for SQLite (default) and PostgreSQL."""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from clipscope.errors import ClipScopeError


_SQLITE_MMAP_BYTES = 1 << 30
_SQLITE_BULK_CACHE_KIB = 256 * 1024
"""SQLite's page cache while a session writes in bulk (:func:`bulk_writes`), against its 2 MB default."""


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


_ORJSON = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def json_dumps(value: Any) -> str:
    """JSON columns' text, through orjson: 8-10x faster than the standard library's ``json.dumps``,
    which took 2.6 s of a 49,152-feature precompute's write (its histograms, intervals, neighbours and
    names). Keys that are not strings are written as strings and NumPy numbers as numbers, as
    ``json.dumps`` writes them; NaN and infinity, which JSON has no word for and PostgreSQL refuses, as
    null. A value orjson cannot write (an integer beyond 64 bits, a float subclass of another library)
    is written by ``json.dumps``, as before."""
    try:
        return orjson.dumps(value, option=_ORJSON).decode()
    except TypeError:
        return json.dumps(value)


def json_loads(text: str | bytes) -> Any:
    """A JSON column's value, through orjson; text it refuses (NaN or Infinity, which ``json.dumps``
    wrote into SQLite before :func:`json_dumps`) through the standard library, as it was written."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


_JSON = {"json_serializer": json_dumps, "json_deserializer": json_loads}


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    check_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **_JSON)

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
        return create_engine(url, pool_pre_ping=True, **_JSON)
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


@contextmanager
def bulk_writes(session: Session) -> Iterator[Session]:
    """``session`` with room for a bulk insert: on SQLite a page cache of 256 MB for the block, then the
    connection's own again; nothing on PostgreSQL. With the default 2 MB, each of a precompute's (or a bundle's)
    million example rows reads and writes back pages of the examples' index on images, whose keys
    come in no order, and its foreign keys' parent pages (docs/benchmarks.md: SQLite's inserts 6.0 -> 3.3 s)."""
    if session.get_bind().dialect.name != "sqlite":
        yield session
        return
    conn = session.connection()
    before = conn.exec_driver_sql("PRAGMA cache_size").scalar()
    conn.exec_driver_sql(f"PRAGMA cache_size=-{_SQLITE_BULK_CACHE_KIB}")
    try:
        yield session
    finally:
        conn.exec_driver_sql(f"PRAGMA cache_size={int(before)}")
