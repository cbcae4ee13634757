"""How the overlap of two SAEs at one hook site is stored (``SaeOverlap``) and judged: each feature's
best decoder cosine among the other SAE's atoms, the precomputes it was measured over, and the
cosine chance alone reaches. Written by the precompute (:mod:`clipscope.matching` computes the
cosines), read by the pages and the feature list without torch."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def chance_level(n: int, d: int) -> float:
    """About the largest cosine between a fixed direction and ``n`` random ones in ``d`` dimensions,
    ``sqrt(2 ln n / d)`` (each cosine is close to normal with variance ``1 / d``)."""
    return math.sqrt(2 * math.log(max(n, 2)) / d)


def pair_versions(mine: dict | None, theirs: dict | None) -> dict:
    """``SaeOverlap.versions`` of a pair measured over these two precomputes (``Sae.precompute`` of each):
    a stored pair is current while it equals this."""
    return {"sae": (mine or {}).get("key"), "other": (theirs or {}).get("key")}


def best_bytes(best: ArrayLike, live: np.ndarray, d_sae: int) -> bytes:
    """``SaeOverlap.best``: the live features' best cosines (an array or a CPU tensor, one per ``live``
    index) at their indices, NaN elsewhere, float16 little-endian."""
    out = np.full(d_sae, np.nan, dtype="<f2")
    out[live] = np.asarray(best)
    return out.tobytes()


def best_of(stored: bytes) -> np.ndarray:
    """:func:`best_bytes` read back as float32."""
    return np.frombuffer(stored, dtype="<f2").astype(np.float32)
