"""Every FastAPI dependency in one place: settings, database sessions, the SAE named in the URL."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Annotated, Callable, Iterator, TypeVar

from fastapi import Depends, HTTPException, Request
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from backend.services.feature_order import FeatureOrders
from clipscope.db.models import Sae
from clipscope.db.session import session_scope
from clipscope.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, committed when the handler returns without error.

    Its dependency has ``scope="function"``: FastAPI's default for a dependency with ``yield`` runs
    the code after it once the response is sent, so a browser following a write's 303 could read
    before the commit, and a commit that failed would already have answered success.
    """
    with session_scope(request.app.state.database_url) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]


_SAE_BY_KEY = select(Sae).where(Sae.key == bindparam("key"))  # built once: every page asks it
_SAE_VERSION = select(Sae.id, Sae.updated_at).where(Sae.key == bindparam("key"))


class SaeRows:
    """The SAE rows the read-only pages use, kept per process and checked against ``updated_at``.

    Loading the row through the ORM (its JSON columns decoded) cost twice the plain two-column query
    that tells whether a kept copy is current; every change to the row moves ``updated_at`` (its
    ``onupdate``), so a copy whose ``updated_at`` matches is the row. Copies are detached: read-only.
    """

    def __init__(self):
        self._rows: dict[str, tuple[datetime, Sae]] = {}
        self._lock = threading.Lock()

    def get(self, session: Session, key: str) -> Sae:
        found = session.connection().execute(_SAE_VERSION, {"key": key}).first()
        if found is None:
            raise HTTPException(status_code=404, detail=f"No SAE {key!r}.")
        kept = self._rows.get(key)
        if kept is not None and kept[0] == found.updated_at:
            return kept[1]
        row = session.get(Sae, found.id, populate_existing=True)
        session.expunge(row)
        with self._lock:
            self._rows[key] = (row.updated_at, row)
        return row


def get_sae(sae: str, session: SessionDep) -> Sae:
    """The SAE named by its key in the path; 404 when unknown."""
    row = session.scalar(_SAE_BY_KEY, {"key": sae})
    if row is None:
        raise HTTPException(status_code=404, detail=f"No SAE {sae!r}.")
    return row


SaeDep = Annotated[Sae, Depends(get_sae)]

T = TypeVar("T")


async def read_sae(request: Request, sae: str, work: Callable[[Session, Sae], T], threaded: bool = False) -> T:
    """``work(session, sae_row)``: a read-only page's whole database work and rendering in one step.

    ``SessionDep`` + ``SaeDep`` + a sync handler make FastAPI hop between the event loop and its
    threads four times (session enter, SAE lookup, handler, session exit), and on these machines
    each hop costs more server CPU than a feature page's queries (docs/benchmarks.md, Serving).
    Here the work runs on the event loop when ``settings.reads_in_event_loop`` resolves to yes
    (SQLite by default), else in one worker thread; ``threaded`` work (encoding a text with CLIP for
    a concept search) always in a worker thread. Only for reads: a write can wait on a lock.
    """

    def run() -> T:
        with session_scope(request.app.state.database_url) as session:
            return work(session, request.app.state.sae_rows.get(session, sae))

    if request.app.state.reads_in_event_loop and not threaded:
        return run()
    return await run_in_threadpool(run)


async def get_feature_orders(request: Request) -> FeatureOrders:
    """The process's store of feature-list orderings (see :mod:`backend.services.feature_order`); async: no I/O, no thread hop."""
    return request.app.state.feature_orders


FeatureOrdersDep = Annotated[FeatureOrders, Depends(get_feature_orders)]
