"""Feature list and feature page queries. Every list query is served by an index on (sae_id, ...)."""

from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, load_only

from clipscope.db.models import Feature, FeatureExample, Image, Label, Sae



class FeatureQuery(BaseModel):
    """Paging, sorting and filtering of the feature list (all of it lives in the URL)."""

    page: int = Field(1, ge=1, le=1_000_000, description="1-based page number.")
    per_page: int = Field(50, ge=1, le=500, description="Features per page.")
    sort: Literal["index", "frequency", "max", "label"] = Field("index", description="Sort key.")
    order: Literal["asc", "desc"] = Field("asc", description="Sort direction.")
    labelled: Literal["any", "yes", "no"] = Field("any", description="Only labelled, only unlabelled, or both.")
    category: Literal["", "semantic", "visual", "noise", "unclear"] = Field("", description="Label category.")
    dead: Literal["any", "only", "hide"] = Field("any", description="Dead features: include, only, or hide.")
    dense: Literal["any", "only", "hide"] = Field("any", description="Very dense features: include, only, or hide.")
    min_freq: float | None = Field(None, ge=0, le=1, description="Lowest firing frequency.")
    max_freq: float | None = Field(None, ge=0, le=1, description="Highest firing frequency.")
    q: str = Field("", max_length=200, description="Case-insensitive substring of the label text.")

    @field_validator("min_freq", "max_freq", mode="before")
    @classmethod
    def _blank_is_none(cls, value):
        """An empty form field means "no bound"."""
        return None if isinstance(value, str) and not value.strip() else value


def _label_join():
    return and_(Label.sae_id == Feature.sae_id, Label.feature == Feature.idx)


def list_features(session: Session, sae: Sae, query: FeatureQuery, strip: int = 6) -> tuple[list[dict[str, Any]], int]:
    """One page of features (with their label and first ``strip`` top images) and the total matching.

    Labels are joined only when a filter or the sort needs them; otherwise the count and the page
    come from the features index alone and the page's labels are fetched by primary key.
    """
    stmt = select(Feature).where(Feature.sae_id == sae.id)
    if query.labelled != "any" or query.category or query.q or query.sort == "label":
        stmt = stmt.outerjoin(Label, _label_join())
        if query.labelled == "yes":
            stmt = stmt.where(Label.id.is_not(None))
        elif query.labelled == "no":
            stmt = stmt.where(Label.id.is_(None))
        if query.category:
            stmt = stmt.where(Label.category == query.category)
        if query.q:
            escaped = query.q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            stmt = stmt.where(func.lower(Label.text).like(f"%{escaped}%", escape="\\"))
    for flag, column in (("dead", Feature.is_dead), ("dense", Feature.is_dense)):
        choice = getattr(query, flag)
        if choice != "any":
            stmt = stmt.where(column.is_(choice == "only"))
    if query.min_freq is not None:
        stmt = stmt.where(Feature.frequency >= query.min_freq)
    if query.max_freq is not None:
        stmt = stmt.where(Feature.frequency <= query.max_freq)
    total = session.scalar(stmt.with_only_columns(func.count()).order_by(None))
    column = {"index": Feature.idx, "frequency": Feature.frequency, "max": Feature.max_activation, "label": func.lower(Label.text)}[query.sort]
    ordered = column.desc() if query.order == "desc" else column.asc()
    if query.sort == "label":
        ordered = ordered.nulls_last()
    page = stmt.with_only_columns(Feature.idx).order_by(ordered, Feature.idx)
    ids = list(session.scalars(page.offset((query.page - 1) * query.per_page).limit(query.per_page)))
    rows = {f.idx: f for f in session.scalars(select(Feature).options(load_only(*LIST_COLUMNS)).where(Feature.sae_id == sae.id, Feature.idx.in_(ids)))} if ids else {}
    features = [rows[i] for i in ids]
    labels = {lab.feature: lab for lab in session.scalars(select(Label).where(Label.sae_id == sae.id, Label.feature.in_(ids)))} if ids else {}
    strips = top_examples(session, sae.id, ids, limit=strip)
    return [{**feature_stats(f), "label": label_dict(labels.get(f.idx)), "examples": strips.get(f.idx, [])} for f in features], total


LIST_COLUMNS = (Feature.idx, Feature.frequency, Feature.n_active, Feature.mean_active, Feature.max_activation, Feature.is_dead, Feature.is_dense)
"""What a list row shows: the JSON columns (histogram, intervals, neighbours) stay unread."""


def feature_stats(f: Feature) -> dict[str, Any]:
    return {
        "index": f.idx, "frequency": f.frequency, "n_active": f.n_active, "mean_active": f.mean_active,
        "max_activation": f.max_activation, "is_dead": f.is_dead, "is_dense": f.is_dense,
    }


def label_dict(label: Label | None) -> dict[str, Any] | None:
    if label is None:
        return None
    return {
        "text": label.text, "category": label.category, "author": label.author, "revision": label.revision,
        "updated_at": label.updated_at.isoformat() if label.updated_at else None,
    }


def _example(e: FeatureExample, img: Image) -> dict[str, Any]:
    return {
        "rank": e.rank, "bucket": e.bucket, "activation": e.activation, "image_id": img.id, "thumbnail": "/" + img.thumbnail,
        "dataset": img.dataset, "split": img.split, "index": img.index, "class_name": img.class_name,
    }


def top_examples(session: Session, sae_id: int, features: list[int], limit: int = 12) -> dict[int, list[dict[str, Any]]]:
    if not features:
        return {}
    rows = session.execute(
        select(FeatureExample, Image)
        .join(Image, Image.id == FeatureExample.image_id)
        .where(FeatureExample.sae_id == sae_id, FeatureExample.feature.in_(features), FeatureExample.bucket == -1, FeatureExample.rank < limit)
        .order_by(FeatureExample.feature, FeatureExample.rank)
    ).all()
    out: dict[int, list[dict[str, Any]]] = {}
    for e, img in rows:
        out.setdefault(e.feature, []).append(_example(e, img))
    return out


def feature_detail(session: Session, sae: Sae, idx: int) -> dict[str, Any] | None:
    """Everything the feature page shows, or None when the SAE has no such feature."""
    row = session.execute(select(Feature, Label).outerjoin(Label, _label_join()).where(Feature.sae_id == sae.id, Feature.idx == idx)).first()
    if row is None:
        return None
    f, label = row
    examples = session.execute(
        select(FeatureExample, Image)
        .join(Image, Image.id == FeatureExample.image_id)
        .where(FeatureExample.sae_id == sae.id, FeatureExample.feature == idx)
        .order_by(FeatureExample.bucket, FeatureExample.rank)
    ).all()
    top = [_example(e, img) for e, img in examples if e.bucket == -1]
    intervals = [dict(iv, index=i, examples=[]) for i, iv in enumerate(f.intervals)]
    for e, img in examples:
        if e.bucket >= 0 and e.bucket < len(intervals):
            intervals[e.bucket]["examples"].append(_example(e, img))
    neighbour_ids = [n for n, _ in f.neighbours]
    labels = {
        lab.feature: lab for lab in session.scalars(select(Label).where(Label.sae_id == sae.id, Label.feature.in_(neighbour_ids)))
    } if neighbour_ids else {}
    return {
        **feature_stats(f),
        "histogram": f.histogram,
        "top": top,
        "intervals": list(reversed(intervals)),  # highest interval first
        "neighbours": [{"index": n, "cosine": c, "label": label_dict(labels.get(n))} for n, c in f.neighbours],
        "label": label_dict(label),
        "prev": idx - 1 if idx > 0 else None,
        "next": idx + 1 if idx + 1 < sae.d_sae else None,
    }


def random_feature(session: Session, sae: Sae, alive_only: bool = True) -> int:
    """A uniformly random feature index (alive ones preferred)."""
    stmt = select(func.count()).select_from(Feature).where(Feature.sae_id == sae.id)
    if alive_only:
        stmt = stmt.where(Feature.is_dead.is_(False))
    n = session.scalar(stmt) or 0
    if n == 0:
        return random.randrange(sae.d_sae)
    pick = select(Feature.idx).where(Feature.sae_id == sae.id)
    if alive_only:
        pick = pick.where(Feature.is_dead.is_(False))
    return session.scalar(pick.order_by(Feature.idx).offset(random.randrange(n)).limit(1))
