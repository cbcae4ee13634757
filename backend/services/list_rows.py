"""The feature list's rows, what of them only a precompute changes, kept per process.

A list page of 50 rows read its features' statistics and their 300 top images joined with the
images table, and wrote 300 ``<figure>``s: ~1.9 of its ~3.3 ms of server CPU (in-process, 49,152
features). Everything a row shows but its label changes only with a precompute (which changes the
SAE row's ``updated_at``), so each feature's line of numbers and its strip are read for the whole
SAE once, in a background thread the first time its list is asked for (~1.3 s on 2 cores at 49,152
features), and kept: ~18 MB at that size (the lines as text; the strips as three arrays and one
``<img>`` per image). A page then reads only its labels: ~1.3 ms instead of ~3.3. Until the rows are built, and for an SAE whose build failed, the list is
written from the database as before: the same HTML (``tests/backend/test_list_rows.py``).
"""

from __future__ import annotations

import logging
import threading
from array import array
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.figures import facts, feature_href, feature_row, feature_rows, figure, image_tag, label_badge, ranked_facts
from backend.services.features import STRIP, FeatureQuery, feature_stats, label_dict, labels_of, list_features, page_of
from backend.services.recently_used import RecentlyUsed
from clipscope.db.models import FEATURE_STATS, Feature, FeatureExample, Image, Sae
from clipscope.db.session import session_scope

if TYPE_CHECKING:
    from backend.services.feature_order import FeatureOrders, Ranking

logger = logging.getLogger(__name__)

_READ_ROWS = 10_000
"""Rows fetched at a time while building (PostgreSQL streams them through a server-side cursor)."""


@dataclass(frozen=True, eq=False)
class KeptRows:
    """One SAE version's list rows without their labels."""

    lines: list[str]
    """Each feature's line of numbers and flags (:func:`backend.figures.facts`), by index."""
    starts: np.ndarray
    """``[d_sae + 1]``: feature ``f``'s strip is slots ``starts[f]`` to ``starts[f + 1]``."""
    images: np.ndarray
    """Each slot's image id, strips in feature order, each by rank."""
    activations: np.ndarray
    """Each slot's activation (float64, as stored)."""
    tags: dict[int, str]
    """The ``<img>`` of every image in a strip, by image id."""

    def strip(self, idx: int) -> str:
        """Feature ``idx``'s strip: what :func:`backend.figures.figures` writes for its first top images."""
        lo, hi = self.starts[idx], self.starts[idx + 1]
        tags = self.tags
        return "\n".join(figure(tags[i], a) for i, a in zip(self.images[lo:hi].tolist(), self.activations[lo:hi].tolist()))

    def rows(self, ids: list[int], labels: dict[int, Any], sae_key: str, ranking: Ranking | None = None, concept: str = "",
             matched_in: str = "") -> Markup:
        """The list's ``<li>`` rows of ``ids``, with their current ``labels`` (``label_dict``s by index):
        what :func:`backend.figures.feature_rows` writes for ``list_features``' rows of the same page."""
        href, lines = feature_href(sae_key), self.lines
        out = []
        for i in ids:
            line = lines[i]
            if ranking is not None:
                line += ranked_facts({ranking.field: float(ranking.scores[i])}, concept, matched_in)
            out.append(feature_row(href, i, label_badge(labels.get(i)), line, self.strip(i)))
        return Markup("\n".join(out))


def read_kept_rows(session: Session, sae_id: int, d_sae: int) -> KeptRows:
    """Every feature's line and strip of SAE ``sae_id``, read in ``session``'s transaction."""
    lines = [""] * d_sae
    read = session.connection().execution_options(yield_per=_READ_ROWS)
    for row in read.execute(select(*FEATURE_STATS).where(Feature.sae_id == sae_id)):
        lines[row[0]] = facts(feature_stats(row))
    in_strips = (FeatureExample.sae_id == sae_id, FeatureExample.bucket == -1, FeatureExample.rank < STRIP)
    slots = (select(FeatureExample.feature, FeatureExample.image_id, FeatureExample.activation).where(*in_strips)
             .order_by(FeatureExample.feature, FeatureExample.rank))
    features, images, activations = array("q"), array("q"), array("d")
    for part in read.execute(slots).partitions():
        feature, image, activation = zip(*part)  # by column: 3x faster than a row at a time
        features.extend(feature)
        images.extend(image)
        activations.extend(activation)
    shown = select(Image.id, Image.thumbnail, Image.class_name, Image.index).where(Image.id.in_(select(FeatureExample.image_id).where(*in_strips)))
    tags = {i: image_tag("/" + thumbnail, class_name, index) for i, thumbnail, class_name, index in read.execute(shown)}
    starts = np.searchsorted(np.frombuffer(features, dtype=np.int64), np.arange(d_sae + 1))
    return KeptRows(lines, starts, np.frombuffer(images, dtype=np.int64), np.frombuffer(activations, dtype=np.float64), tags)


class ListRows:
    """The kept rows of the most recently listed SAEs (``capacity`` of them), each built once in the
    background: :meth:`find` answers None meanwhile."""

    def __init__(self, database_url: str, capacity: int = 2):
        self._url = database_url
        self._kept: RecentlyUsed[KeptRows] = RecentlyUsed(capacity)
        self._lock = threading.Lock()
        self._building: dict[tuple[int, datetime], threading.Thread] = {}
        self._failed: set[tuple[int, datetime]] = set()

    def find(self, sae: Sae) -> KeptRows | None:
        """The kept rows of ``sae``'s current version, or None; on None their build starts, unless it
        runs or failed (then the list keeps reading the database for this version)."""
        key = (sae.id, sae.updated_at)
        kept = self._kept.find(key)
        if kept is None:
            with self._lock:
                if key not in self._building and key not in self._failed:
                    thread = threading.Thread(target=self._build, args=(key, sae.d_sae), name="clipscope-list-rows", daemon=True)
                    self._building[key] = thread
                    thread.start()
        return kept

    def page(self, session: Session, sae: Sae, query: FeatureQuery, orders: FeatureOrders, ranking: Ranking | None = None) -> tuple[Markup, int, int]:
        """The ``<li>`` rows of ``query``'s page (ranked by ``ranking``, if any), how many they are, and how
        many features match in all: from the kept rows, or, until they are built, from the database."""
        kept = self.find(sae)
        if kept is None:
            found, total = list_features(session, sae, query, orders, ranking=ranking)
            return feature_rows(found, sae.key, query.concept, query.matched_in), len(found), total
        ids, total = page_of(session, sae, query, orders, ranking)
        labels = {i: label_dict(label) for i, label in labels_of(session, sae.id, ids).items()}
        return kept.rows(ids, labels, sae.key, ranking, query.concept, query.matched_in), len(ids), total

    def _build(self, key: tuple[int, datetime], d_sae: int) -> None:
        sae_id, version = key
        try:
            with session_scope(self._url) as session:
                kept = read_kept_rows(session, sae_id, d_sae)
                # Read last: if the SAE is still at this version, no precompute committed before any of the reads above began.
                current = session.scalar(select(Sae.updated_at).where(Sae.id == sae_id))
            if current == version:
                self._kept.put(key, kept)
        except Exception:
            logger.exception("the feature list's rows of SAE %s could not be kept; its list reads them from the database", sae_id)
            with self._lock:
                self._failed.add(key)
        finally:
            with self._lock:
                self._building.pop(key, None)

    def wait(self, timeout: float | None = None) -> None:
        """Until every build started so far has ended (the app's shutdown; tests)."""
        with self._lock:
            threads = list(self._building.values())
        for thread in threads:
            thread.join(timeout)
