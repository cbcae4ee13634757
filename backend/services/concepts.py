"""Concept search: an SAE's features ranked by how well their top images match any text, through CLIP.

A feature's score for a text is what its automatic name's score is for a vocabulary concept
(``clipscope/naming.py``): ``(m_f - m) . t``, the text's CLIP embedding ``t`` against the mean
embedding of the feature's top images beyond the average image's. The precompute keeps each
feature's ``m_f - m`` beside the SAE (``directions_file``); a search encodes the text with the SAE's
CLIP, with the templates the vocabulary was encoded with, and takes one product.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backend.services.recently_used import RecentlyUsed
from clipscope.db.models import Sae
from clipscope.errors import ClipScopeError

if TYPE_CHECKING:  # the analyzer, or the app's LazyAnalyzer standing for it: torch is imported with it
    from backend.services.analyze import Analyzer


class ConceptsUnavailable(Exception):
    """The SAE's precompute kept no feature directions (automatic names were off, or it predates them),
    or its CLIP cannot be loaded on this server to encode the text."""


class ConceptSearch:
    """Scores per (SAE precompute, text), the most recent few kept; directions loaded once per precompute."""

    def __init__(self, analyzer: Analyzer, data_dir: Path, max_texts: int = 32):
        self.analyzer, self.data_dir = analyzer, Path(data_dir)
        self._directions: dict[str, tuple[str, np.ndarray]] = {}
        self._scores: RecentlyUsed[np.ndarray] = RecentlyUsed(max_texts)
        self._lock = threading.Lock()

    def scores(self, sae: Sae, text: str) -> np.ndarray:
        """``[d_sae]`` float32 scores of ``text``; NaN for features without top images."""
        names = (sae.precompute or {}).get("names") or {}
        if not names.get("directions"):
            raise ConceptsUnavailable(
                f"SAE {sae.key} has no feature directions to search: its precompute ran without automatic names "
                "(precompute.names.enabled) or before they existed; run `clipscope precompute` again."
            )
        return self._scores.get((sae.key, names["directions"], text), lambda: self._score(sae, names, text))

    def _score(self, sae: Sae, names: dict, text: str) -> np.ndarray:
        directions = self._load(sae, names["directions"])
        try:
            vector = self.analyzer.text_embedding(sae, text, names["templates"]).numpy()
        except ClipScopeError as exc:  # e.g. the SAE's CLIP weights are not on this server
            raise ConceptsUnavailable(f"Cannot encode the text with SAE {sae.key}'s CLIP: {exc}") from None
        scores = directions @ vector
        scores[~directions.any(axis=1)] = np.nan
        return scores

    def _load(self, sae: Sae, name: str) -> np.ndarray:
        kept = self._directions.get(sae.key)
        if kept is not None and kept[0] == name:
            return kept[1]
        path = self.data_dir / "saes" / sae.key / name
        if not path.is_file():
            raise ConceptsUnavailable(f"{path} is missing: run `clipscope precompute` again to search SAE {sae.key}'s features by text.")
        directions = np.load(path).astype(np.float32)
        with self._lock:
            self._directions[sae.key] = (name, directions)
        return directions
