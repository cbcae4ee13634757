"""Feature list and feature page queries. Every list query is served by an index on (sae_id, ...)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from backend.services.feature_order import FeatureOrders, Ranking
from backend.services.saes import match_ranking
from clipscope.db.models import FEATURE_STAT_NAMES, FEATURE_STATS, Feature, FeatureExample, Image, Label, Sae
from clipscope.veils import fractions

if TYPE_CHECKING:
    from backend.services.concepts import ConceptSearch


class FeatureFilter(BaseModel):
    """Sorting and filtering of the features (all of it lives in the URL): which features, in which order."""

    sort: Literal["index", "frequency", "max", "label", "class_share", "coherence", "sample"] = Field(
        "index",
        description="Sort key; class_share: the share of a feature's firing images in its leading class (how class-pure it is); "
        "coherence: how alike CLIP finds its top images, beyond two random images of the set; sample: the SAE's fixed random "
        "order, the same for everyone, whose labelled start estimates each label category's share of all live features.",
    )
    order: Literal["asc", "desc"] = Field("asc", description="Sort direction.")
    labelled: Literal["any", "yes", "no"] = Field("any", description="Only labelled, only unlabelled, or both.")
    category: Literal["", "semantic", "visual", "noise", "unclear"] = Field("", description="Label category.")
    dead: Literal["any", "only", "hide"] = Field("any", description="Dead features: include, only, or hide.")
    dense: Literal["any", "only", "hide"] = Field("any", description="Very dense features: include, only, or hide.")
    min_freq: float | None = Field(None, ge=0, le=1, description="Lowest firing frequency.")
    max_freq: float | None = Field(None, ge=0, le=1, description="Highest firing frequency.")
    q: str = Field("", max_length=200, description='Case-insensitive substring of the label text; in double quotes ("...") the whole text.')
    top_class: str = Field(
        "", max_length=200, description="Case-insensitive substring of the feature's leading class (the class holding most of the images it "
        'fires on); in double quotes ("man") the whole name, so "man" leaves out woman.'
    )
    auto_name: str = Field("", max_length=200, description='Case-insensitive substring of the feature\'s automatic name; in double quotes the whole name.')
    concept: str = Field(
        "", max_length=200,
        description="Rank by how well each feature's top images match this text through CLIP, best first (the score its automatic "
        "name gets, for any words); replaces sort and order. Features without top images are left out.",
    )
    matched_in: str = Field(
        "", max_length=128,
        description="Rank by each feature's best decoder cosine among the live atoms of this other SAE at the same hook site (its key): "
        "order=asc puts first the features it lacks, order=desc those it shares; replaces sort. Dead features are left out.",
    )

    @field_validator("min_freq", "max_freq", mode="before")
    @classmethod
    def _blank_is_none(cls, value):
        """An empty form field means "no bound"."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("concept")
    @classmethod
    def _one_spaced(cls, value: str) -> str:
        """Spaces collapsed: "  berries  on cream " is the search "berries on cream" (and only spaces, none)."""
        return " ".join(value.split())

    def ranking_mistake(self) -> str | None:
        """Why the list cannot be ranked as asked (two rankings at once), or None."""
        if self.concept and self.matched_in:
            return "concept and matched_in both rank the list: ask for one of them."
        return None

    def frequency_mistake(self) -> str | None:
        """Why the frequency range is one no feature can fall in (a mistake to point out, not an empty list), or None."""
        if self.min_freq is not None and self.max_freq is not None and self.min_freq > self.max_freq:
            return f"min_freq ({self.min_freq:g}) is above max_freq ({self.max_freq:g}): no frequency lies between them."
        return None


class FeatureQuery(FeatureFilter):
    """One page of a :class:`FeatureFilter`'s features."""

    page: int = Field(1, ge=1, le=1_000_000, description="1-based page number.")
    per_page: int = Field(50, ge=1, le=500, description="Features per page.")


DETAIL_COLUMNS = (*FEATURE_STATS, Feature.histogram, Feature.intervals, Feature.neighbours, Feature.classes, Feature.auto_names,
                  Feature.output_names)
LABEL_COLUMNS = (Label.feature, Label.text, Label.category, Label.author, Label.revision, Label.updated_at)


EXAMPLE_COLUMNS = (
    FeatureExample.feature, FeatureExample.rank, FeatureExample.bucket, FeatureExample.activation, FeatureExample.token_map,
    Image.id.label("image_id"), Image.thumbnail, Image.dataset, Image.split, Image.index, Image.class_name,
)
"""An example as plain columns: rows come back as tuples, without building two ORM objects each."""

# The pages' statements, built once with bound parameters: building a select per request cost more
# than SQLite's work for it (0.66 ms against 0.15 ms for a feature page's three queries).
_SAE, _FEATURES = bindparam("sae"), bindparam("features", expanding=True)
_FEATURE_ROWS = select(*FEATURE_STATS).where(Feature.sae_id == _SAE, Feature.idx.in_(_FEATURES))
_FEATURE_DETAIL = select(*DETAIL_COLUMNS).where(Feature.sae_id == _SAE, Feature.idx == bindparam("idx"))
_MAXIMA = select(Feature.idx, Feature.max_activation, Feature.frequency, Feature.auto_name).where(Feature.sae_id == _SAE, Feature.idx.in_(_FEATURES))
_LABELS = select(*LABEL_COLUMNS).where(Label.sae_id == _SAE, Label.feature.in_(_FEATURES))
_ALL_FEATURE_ROWS = select(*FEATURE_STATS).where(Feature.sae_id == _SAE)
_ALL_LABELS = select(*LABEL_COLUMNS).where(Label.sae_id == _SAE)
_IN_LIST_LIMIT = 2000
"""Up to this many features are read by ``IN (...)``, more by reading the SAE's whole table (SQLite bounds
the number of bound parameters, to 32,766 by default)."""
_EXAMPLES = select(*EXAMPLE_COLUMNS).join(Image, Image.id == FeatureExample.image_id)
_ORDER = (FeatureExample.feature, FeatureExample.bucket, FeatureExample.rank)
_FEATURE_EXAMPLES = _EXAMPLES.where(FeatureExample.sae_id == _SAE, FeatureExample.feature == bindparam("idx")).order_by(*_ORDER)
_TOP_EXAMPLES = _EXAMPLES.where(
    FeatureExample.sae_id == _SAE, FeatureExample.feature.in_(_FEATURES), FeatureExample.bucket == -1,
    FeatureExample.rank < bindparam("limit"),
).order_by(*_ORDER)


def _rows(session: Session, statement, **params) -> list:
    """Plain rows through the session's connection (and transaction), without the ORM's execution layer."""
    return session.connection().execute(statement, params).all()


def ranking_of(concepts: "ConceptSearch", session: Session, sae: Sae, query: FeatureFilter) -> Ranking | None:
    """What ranks the list instead of its sort: a concept search's match, or each feature's best cosine in
    another SAE; None for neither. Raises ConceptsUnavailable or NotShared when it cannot be had."""
    if query.concept:
        return Ranking(concepts.scores(sae, query.concept), "concept_score")
    if query.matched_in:
        return match_ranking(session, sae, query.matched_in, descending=query.order == "desc")
    return None


STRIP = 6
"""How many top images a row of the feature list shows."""


def list_features(
    session: Session, sae: Sae, query: FeatureQuery, orders: FeatureOrders, strip: int = STRIP, ranking: Ranking | None = None
) -> tuple[list[dict[str, Any]], int]:
    """One page of features (with their label and first ``strip`` top images) and the total matching;
    with a ``ranking``, ranked by it and each row carries its score (under ``ranking.field``)."""
    ids, total = page_of(session, sae, query, orders, ranking)
    if not ids:
        return [], total
    rows = {r.idx: r for r in _rows(session, _FEATURE_ROWS, sae=sae.id, features=ids)}
    labels = labels_of(session, sae.id, ids)
    strips = top_examples(session, sae.id, ids, limit=strip)
    out = [{**feature_stats(rows[i]), "label": label_dict(labels.get(i)), "examples": strips.get(i, [])} for i in ids]
    if ranking is not None:
        for row in out:
            row[ranking.field] = float(ranking.scores[row["index"]])
    return out, total


def page_of(session: Session, sae: Sae, query: FeatureQuery, orders: FeatureOrders, ranking: Ranking | None = None) -> tuple[list[int], int]:
    """The indices of the features on ``query``'s page, and how many features match in all."""
    order = orders.get(session, sae, query, ranking)
    return [int(i) for i in order[(query.page - 1) * query.per_page : query.page * query.per_page]], len(order)


def table_fields(ranking: Ranking | None = None) -> tuple[str, ...]:
    """The columns of :func:`feature_table`'s rows, in order."""
    labels = tuple(f"label_{k}" for k in ("text", "category", "author", "revision", "updated_at"))
    return (*FEATURE_STAT_NAMES, *labels, *((ranking.field,) if ranking is not None else ()))


def feature_table(
    session: Session, sae: Sae, query: FeatureFilter, orders: FeatureOrders, ranking: Ranking | None = None
) -> list[dict[str, Any]]:
    """Every feature ``query`` selects, in its order, as flat rows (:func:`table_fields`): the list's statistics,
    the current label, and with a ``ranking`` each feature's score."""
    ids = orders.get(session, sae, query, ranking).tolist()
    if len(ids) <= _IN_LIST_LIMIT:
        found, labelled = _rows(session, _FEATURE_ROWS, sae=sae.id, features=ids), labels_of(session, sae.id, ids)
    else:
        found = _rows(session, _ALL_FEATURE_ROWS, sae=sae.id)
        labelled = {lab.feature: lab for lab in _rows(session, _ALL_LABELS, sae=sae.id)}
    stats = {r.idx: r for r in found}
    out = []
    for i in ids:
        label = label_dict(labelled.get(i)) or {}
        row = {**feature_stats(stats[i]), **{f"label_{k}": v for k, v in label.items()}}
        if ranking is not None:
            row[ranking.field] = float(ranking.scores[i])
        out.append(row)
    return out


def maxima_of(session: Session, sae_id: int, features: list[int]) -> dict[int, Any]:
    """``(idx, max_activation, frequency, auto_name)`` of each of ``features``: what live analysis ranks by and shows."""
    return {f.idx: f for f in _rows(session, _MAXIMA, sae=sae_id, features=features)} if features else {}


def labels_of(session: Session, sae_id: int, features: list[int]) -> dict[int, Any]:
    """The current label row of each of ``features`` that has one."""
    return {lab.feature: lab for lab in _rows(session, _LABELS, sae=sae_id, features=features)} if features else {}


def feature_stats(row) -> dict[str, Any]:
    """The statistics of a row that starts with :data:`FEATURE_STATS`, under :data:`FEATURE_STAT_NAMES`' names."""
    return dict(zip(FEATURE_STAT_NAMES, row))  # 4x faster than reading the row's attributes by name


def label_dict(label: Label | None) -> dict[str, Any] | None:
    if label is None:
        return None
    return {
        "text": label.text, "category": label.category, "author": label.author, "revision": label.revision,
        "updated_at": label.updated_at.isoformat() if label.updated_at else None,
    }


def _example(row) -> dict[str, Any]:
    _feature, rank, bucket, activation, token_map, image_id, thumbnail, dataset, split, index, class_name = row  # unpacking: 3x faster than attributes
    return {
        "rank": rank, "bucket": bucket, "activation": activation, "image_id": image_id, "thumbnail": "/" + thumbnail,
        "dataset": dataset, "split": split, "index": index, "class_name": class_name,
        "token_map": fractions(token_map) if token_map is not None else None,
    }


def feature_cards(session: Session, sae_id: int, features: list[int], strip: int = 4) -> dict[int, dict[str, Any]]:
    """What a listed feature shows beside its own numbers, for each of ``features``: its current label,
    its automatic name and its ``strip`` top images (three queries for the lot)."""
    stats, labels, strips = maxima_of(session, sae_id, features), labels_of(session, sae_id, features), top_examples(session, sae_id, features, strip)
    return {f: {"label": label_dict(labels.get(f)), "auto_name": stats[f].auto_name if f in stats else None, "examples": strips.get(f, [])}
            for f in features}


def top_examples(session: Session, sae_id: int, features: list[int], limit: int = 12) -> dict[int, list[dict[str, Any]]]:
    if not features:
        return {}
    out: dict[int, list[dict[str, Any]]] = {}
    for row in _rows(session, _TOP_EXAMPLES, sae=sae_id, features=features, limit=limit):
        out.setdefault(row[0], []).append(_example(row))  # row[0], the feature: half the cost of ``row.feature`` for a list's 300 rows
    return out


def feature_detail(session: Session, sae: Sae, idx: int) -> dict[str, Any] | None:
    """Everything the feature page shows, or None when the SAE has no such feature.

    Three indexed queries answered as plain rows: the feature, its examples with their images,
    and the labels of the feature and its neighbours together.
    """
    found = _rows(session, _FEATURE_DETAIL, sae=sae.id, idx=idx)
    if not found:
        return None
    f = found[0]
    examples = _rows(session, _FEATURE_EXAMPLES, sae=sae.id, idx=idx)
    top = [_example(e) for e in examples if e.bucket == -1]
    intervals = [dict(iv, index=i, examples=[]) for i, iv in enumerate(f.intervals)]
    for e in examples:
        if 0 <= e.bucket < len(intervals):
            intervals[e.bucket]["examples"].append(_example(e))
    labels = labels_of(session, sae.id, [idx, *(nb[0] for nb in f.neighbours)])
    return {
        **feature_stats(f),
        "histogram": f.histogram,
        "classes": f.classes or [],
        "auto_names": f.auto_names or [],
        "output_names": f.output_names or [],
        "top": top,
        "intervals": list(reversed(intervals)),  # highest interval first
        "neighbours": [
            {"index": n, "cosine": c, "label": label_dict(labels.get(n)), "auto_name": name[0] if name else None}  # no name before format 3
            for n, c, *name in f.neighbours
        ],
        "label": label_dict(labels.get(idx)),
        "prev": idx - 1 if idx > 0 else None,
        "next": idx + 1 if idx + 1 < sae.d_sae else None,
    }


def random_feature(session: Session, sae: Sae, orders: FeatureOrders) -> int:
    """A uniformly random live feature (any feature when none is live), drawn from the kept ordering of the live
    ones: the list's "hide dead" view (a count and an offset per draw took 9 ms on SQLite, 32 ms on PostgreSQL
    at 49,152 features)."""
    alive = orders.get(session, sae, FeatureQuery(dead="hide"))
    return int(random.choice(alive)) if len(alive) else random.randrange(sae.d_sae)
