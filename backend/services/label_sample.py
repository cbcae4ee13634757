"""What the labels say about an SAE as a whole: a fixed random order of its features to label in, and
the share of each category it estimates over all of its live features, with 95 % intervals.

The study labelled the 300 most active features, which tells what the most active features are, not
what the SAE's features are. Labels given in one random order that everyone shares (label the first
unlabelled feature, never skip one: a feature you cannot judge is "unclear") make the labelled start of
that order a simple random sample of the live features, and its category counts an unbiased
estimate. The intervals are Wilson score intervals, which stay inside [0, 1] and hold up for the few
dozen labels a person gives in a sitting.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.services.labels import CATEGORIES
from backend.services.recently_used import RecentlyUsed
from clipscope.config import stable_hash
from clipscope.db.models import Feature, Label, LabelRevision, Sae

Z_95 = 1.959963984540054
"""The standard normal's 97.5th percentile: two-sided 95 % intervals."""


def sample_order(sae_key: str, d_sae: int) -> np.ndarray:
    """The SAE's features in its sample order: a permutation seeded by the SAE's key, so the same in
    every process and for every labeller."""
    return np.random.default_rng(int(stable_hash(sae_key), 16)).permutation(d_sae).astype(np.int32)


def sample_rank(sae_key: str, d_sae: int) -> np.ndarray:
    """Each feature's position in :func:`sample_order`."""
    rank = np.empty(d_sae, dtype=np.int32)
    rank[sample_order(sae_key, d_sae)] = np.arange(d_sae, dtype=np.int32)
    return rank


def wilson(count: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``count / n`` (``(0, 1)`` when ``n`` is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = count / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def live_in_sample_order(session: Session, sae: Sae) -> np.ndarray:
    """The SAE's live features (those that fire on a precompute image), in its sample order."""
    alive = np.fromiter(session.scalars(select(Feature.idx).where(Feature.sae_id == sae.id, Feature.is_dead.is_(False))), dtype=np.int32)
    return alive[np.argsort(sample_rank(sae.key, sae.d_sae)[alive], kind="stable")]


def label_summary(session: Session, sae: Sae, ordered: np.ndarray | None = None) -> dict[str, Any]:
    """``labelled`` (features with a label) and ``categories`` (how many of each); ``sample``: ``alive``
    (live features), ``n`` (how many of them, from the start of the sample order, are all labelled),
    ``next`` (the first live feature there without a label, None when there is none) and ``shares``
    (per category of those ``n``: ``count``, ``share``, ``low`` and ``high`` of its 95 % interval).
    ``ordered``: :func:`live_in_sample_order`, when the caller keeps it."""
    rows = session.execute(select(Label.feature, Label.category, Label.author).where(Label.sae_id == sae.id)).all()
    labels, authors = {r.feature: r.category for r in rows}, {r.feature: r.author for r in rows}
    if ordered is None:
        ordered = live_in_sample_order(session, sae)
    labelled = np.isin(ordered, np.fromiter(labels, dtype=np.int64, count=len(labels)))
    n = len(ordered) if labelled.all() else int(np.argmin(labelled))
    counts = Counter(labels[int(f)] for f in ordered[:n])
    shares = [{"category": c, "count": counts[c], "share": counts[c] / n if n else None, **dict(zip(("low", "high"), wilson(counts[c], n)))}
              for c in CATEGORIES]
    every = Counter(labels.values())
    return {"labelled": len(labels), "categories": {c: every[c] for c in CATEGORIES},
            "sample": {"alive": len(ordered), "n": n, "next": int(ordered[n]) if n < len(ordered) else None, "shares": shares,
                       "by_author": _by_author([(authors[int(f)], labels[int(f)]) for f in ordered[:n]])}}


def _by_author(labelled: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per author of the sample's current labels (most labels first): ``n`` and, per category, ``count`` and
    ``share`` of theirs. Labellers who call alike features differently show here, where the pooled
    estimate hides them."""
    per: dict[str, Counter] = {}
    for author, category in labelled:
        per.setdefault(author, Counter())[category] += 1
    out = [{"author": a, "n": sum(c.values()), "categories": {k: {"count": c[k], "share": c[k] / sum(c.values())} for k in CATEGORIES}}
           for a, c in per.items()]
    return sorted(out, key=lambda r: (-r["n"], r["author"]))


class LabelSummaries:
    """:func:`label_summary` kept per version of the SAE row and of the labels (the newest revision, so
    a label written by any process, the API or ``clipscope import`` included, is counted next time);
    the live features' sample order per version of the SAE row alone, so a new label costs only the
    labels' read (49,152 features, 300 labels: 51 -> 1.1 ms in-process)."""

    def __init__(self, capacity: int = 16):
        self._kept: RecentlyUsed[dict[str, Any]] = RecentlyUsed(capacity)
        self._orders: RecentlyUsed[np.ndarray] = RecentlyUsed(capacity)

    def of(self, session: Session, sae: Sae) -> dict[str, Any]:
        version = (sae.id, sae.updated_at)
        ordered = lambda: self._orders.get(version, lambda: live_in_sample_order(session, sae))  # noqa: E731
        key = (*version, session.scalar(select(func.max(LabelRevision.id))))
        return self._kept.get(key, lambda: label_summary(session, sae, ordered()))
