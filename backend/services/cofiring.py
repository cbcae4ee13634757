"""A feature's partners: the features that fire on the same precompute images
(:mod:`clipscope.cofiring`), from the SAE the analysis keeps and its precompute's activation cache."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from backend.services.features import feature_cards
from backend.services.recently_used import RecentlyUsed
from clipscope.activation_cache import open_precompute_cache
from clipscope.db.models import Sae

if TYPE_CHECKING:  # imported with the first table: they need torch
    from backend.services.analyze import Analyzer
    from clipscope.cofiring import FiringTable

MAX_IMAGES = 10_000
"""Images of the precompute set the table is built over (the first ones; the study's precompute set
is 5,000): encoding them through a 49,152-latent SAE is a few seconds on 2 CPU cores, once per SAE."""


class CoFiring:
    """Keeps the firing tables of the ``capacity`` most recently asked SAEs (int64 entries: ~40 MB for
    5,000 images x k = 500), keyed by the SAE row's version. A table is encoded with the SAE the analysis
    keeps (:meth:`Analyzer.sae`), on its device: no second copy of the weights, and no second read."""

    def __init__(self, data_dir: Path, analyzer: Analyzer, capacity: int = 2):
        self.data_dir, self.analyzer = Path(data_dir), analyzer
        self._tables: RecentlyUsed[FiringTable] = RecentlyUsed(capacity)

    def table(self, sae: Sae) -> FiringTable:
        return self._tables.get((sae.key, sae.updated_at), lambda: self._build(sae))

    def _build(self, sae: Sae) -> FiringTable:
        from clipscope.cofiring import FiringTable

        cache = open_precompute_cache(self.data_dir, sae)
        return FiringTable.from_cache(self.analyzer.sae(sae), cache, MAX_IMAGES)

    def of(self, session: Session, sae: Sae, idx: int, k: int = 8, strip: int = 4) -> dict[str, Any]:
        """Feature ``idx``'s ``k`` partners with their labels, automatic names and top images."""
        table = self.table(sae)
        partners = table.partners(idx, k)
        cards = feature_cards(session, sae.id, [p["index"] for p in partners], strip)
        return {"n_images": table.n_images, "fires_on": table.fires_on(idx), "partners": [{**p, **cards[p["index"]]} for p in partners]}
