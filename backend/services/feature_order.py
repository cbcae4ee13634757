"""The ordered feature indices behind the feature list, kept per process.

A list page is a slice of one ordering (filters + sort) of an SAE's features. Asking SQLite for
``COUNT(*)`` and ``OFFSET n`` on every request walks up to 49,152 index entries each time; the
whole ordering costs one such walk, so it is fetched once and kept: the page is then a slice and
the total its length.

An ordering is keyed by the SAE row's ``updated_at`` (a new precompute changes it) and, when the
filters or the sort read labels, by the newest label revision id, so a label written by any
process (web, API, ``clipscope import``) is seen on the next request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from backend.services.label_sample import sample_rank
from backend.services.recently_used import RecentlyUsed
from clipscope.db.models import Feature, Label, LabelRevision, Sae

if TYPE_CHECKING:
    from backend.services.features import FeatureQuery

@dataclass(frozen=True, eq=False)
class Ranking:
    """Per-feature scores that rank a list instead of its sort: a concept search's match, or each feature's
    best decoder cosine in another SAE. A feature whose score is NaN is left out."""

    scores: np.ndarray
    field: str
    """The name each row carries its score under (``concept_score``, ``match_cosine``)."""
    descending: bool = True
    version: Any = None
    """What the scores depend on beyond the query (kept orderings are keyed by it)."""


def reads_labels(query: FeatureQuery) -> bool:
    return query.labelled != "any" or bool(query.category) or bool(query.q) or query.sort == "label"


class FeatureOrders:
    """A bounded least-recently-used store of orderings (each an int32 array: 192 KiB at 49,152 features)."""

    def __init__(self, max_entries: int = 64):
        self._entries: RecentlyUsed[np.ndarray] = RecentlyUsed(max_entries)

    def get(self, session: Session, sae: Sae, query: FeatureQuery, ranking: Ranking | None = None) -> np.ndarray:
        """The ordering of ``query``; with a ``ranking`` (the query names it: a concept, another SAE), the
        filtered features that have a score, by it (ties by index)."""
        labels_version = session.scalar(select(func.max(LabelRevision.id))) if reads_labels(query) else None
        filters = query.model_dump(exclude={"page", "per_page"})  # every other field shapes the ordering
        ranked = (ranking.descending, ranking.version) if ranking is not None else None
        key = (sae.id, sae.updated_at, labels_version, ranked, *filters.values())
        return self._entries.get(key, lambda: _fetch(session, sae, query, ranking))


def _fetch(session: Session, sae: Sae, query: FeatureQuery, ranking: Ranking | None) -> np.ndarray:
    if ranking is None and query.sort != "sample":
        return np.fromiter(session.scalars(ordering(sae, query)), dtype=np.int32)
    ids = np.fromiter(session.scalars(ordering(sae, query.model_copy(update={"sort": "index", "order": "asc"}))), dtype=np.int32)
    if ranking is None:  # the sample order, kept in no column
        ids = ids[np.argsort(sample_rank(sae.key, sae.d_sae)[ids], kind="stable")]
        return ids[::-1].copy() if query.order == "desc" else ids
    scores = ranking.scores[ids]
    ids, scores = ids[~np.isnan(scores)], scores[~np.isnan(scores)]
    return ids[np.argsort(-scores if ranking.descending else scores, kind="stable")]


def _like_escaped(text: str) -> str:
    """Lower-cased, with LIKE's wildcards escaped: a search matches its text literally."""
    return text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def text_match(column, text: str):
    """``column`` holds ``text``, case-insensitively; in double quotes (``"man"``), ``column`` is exactly it
    (so a search for the class "man" leaves out "woman")."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return func.lower(column) == text[1:-1].lower()
    return func.lower(column).like(f"%{_like_escaped(text)}%", escape="\\")


def label_join():
    return and_(Label.sae_id == Feature.sae_id, Label.feature == Feature.idx)


def ordering(sae: Sae, query: FeatureQuery):
    """``SELECT idx`` of the features matching ``query``'s filters, in its order (ties by index)."""
    stmt = select(Feature.idx).where(Feature.sae_id == sae.id)
    if reads_labels(query):
        stmt = stmt.outerjoin(Label, label_join())
        if query.labelled == "yes":
            stmt = stmt.where(Label.id.is_not(None))
        elif query.labelled == "no":
            stmt = stmt.where(Label.id.is_(None))
        if query.category:
            stmt = stmt.where(Label.category == query.category)
        if query.q:
            stmt = stmt.where(text_match(Label.text, query.q))
    for flag, column in (("dead", Feature.is_dead), ("dense", Feature.is_dense)):
        choice = getattr(query, flag)
        if choice != "any":
            stmt = stmt.where(column.is_(choice == "only"))
    if query.top_class:
        stmt = stmt.where(text_match(Feature.top_class, query.top_class))
    if query.auto_name:
        stmt = stmt.where(text_match(Feature.auto_name, query.auto_name))
    if query.min_freq is not None:
        stmt = stmt.where(Feature.frequency >= query.min_freq)
    if query.max_freq is not None:
        stmt = stmt.where(Feature.frequency <= query.max_freq)
    column = {
        "index": Feature.idx, "frequency": Feature.frequency, "max": Feature.max_activation, "label": func.lower(Label.text),
        "class_share": Feature.top_class_share, "coherence": Feature.coherence,
    }[query.sort]
    ordered = column.desc() if query.order == "desc" else column.asc()
    if query.sort in ("label", "class_share", "coherence"):
        ordered = ordered.nulls_last()
    return stmt.order_by(ordered, Feature.idx)
