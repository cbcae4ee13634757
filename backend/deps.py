"""Every FastAPI dependency in one place: settings, database sessions, the SAE named in the URL."""

from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.services.feature_order import FeatureOrders
from clipscope.db.models import Sae
from clipscope.db.session import session_scope
from clipscope.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, committed when the handler returns without error."""
    with session_scope(request.app.state.database_url) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_sae(sae: str, session: SessionDep) -> Sae:
    """The SAE named by its key in the path; 404 when unknown."""
    row = session.scalar(select(Sae).where(Sae.key == sae))
    if row is None:
        raise HTTPException(status_code=404, detail=f"No SAE {sae!r}.")
    return row


SaeDep = Annotated[Sae, Depends(get_sae)]


async def get_feature_orders(request: Request) -> FeatureOrders:
    """The process's store of feature-list orderings (see :mod:`backend.services.feature_order`); async: no I/O, no thread hop."""
    return request.app.state.feature_orders


FeatureOrdersDep = Annotated[FeatureOrders, Depends(get_feature_orders)]
