"""Which images of an SAE's precompute set a few features can fire on, without encoding the whole set.

A TopK SAE keeps, for each input row, the k largest of ``ReLU(pre)``; a feature fires on a row only if its
pre-activation reaches the row's k-th largest value, its *threshold*. With every row's threshold kept
(one float a token row, written by the first full pass over the set), a few features' pre-activations
over the whole set are one narrow product, ``[rows, d] x [d, features]``, and only the rows where one of
them comes within a margin of the threshold can hold a firing entry. Those rows are then encoded in full,
so the answer is the full pass's (values to the products' rounding, as between any two batchings): the
screen only decides which rows need no encoding. The margin covers that rounding (the narrow product sums
in another order than the encoder's).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipscope.sae.model import SparseCode, TopKSAE

log = logging.getLogger(__name__)

MARGIN = 1e-3
"""How far under a row's threshold (relative to 1 + its size) a pre-activation still makes the row a candidate."""


def row_thresholds(code: SparseCode) -> torch.Tensor:
    """Each row's threshold: the smallest of its k kept values (0 when fewer than k pre-activations are positive)."""
    return code.values.min(1).values.float().cpu()


def candidate_images(sae: TopKSAE, acts: np.ndarray, features: torch.Tensor, thresholds: np.ndarray, batch_size: int) -> np.ndarray:
    """The images (rows of ``acts``, ``[images, tokens, d]``) on which one of ``features`` may fire, given each
    token row's ``thresholds`` (``[images * tokens]``)."""
    weight = sae.encoder_weight.detach()[features.to(sae.encoder_weight.device)]
    bias = sae.b_enc.detach()[features.to(sae.b_enc.device)]
    tokens = acts.shape[1]
    out = []
    for start in range(0, acts.shape[0], batch_size):
        x = torch.from_numpy(np.asarray(acts[start : start + batch_size], dtype=np.float32)).to(weight.device)
        pre = F.linear(x.reshape(-1, x.shape[-1]) - sae.b_dec.detach(), weight, bias).cpu()
        tau = torch.from_numpy(thresholds[start * tokens : start * tokens + pre.shape[0]]).clamp_min(0)
        near = (pre >= (tau - MARGIN * (1 + tau.abs()))[:, None]).any(1)
        out.append(start + np.unique(near.nonzero().flatten().numpy() // tokens))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class Thresholds:
    """The thresholds of one SAE's rows over one precompute set, kept as ``<folder>/<version>.npy`` (the version:
    the precompute's key, so a new precompute writes new ones and removes the old)."""

    def __init__(self, folder: Path, version: str, rows: int):
        self.folder, self.path, self.rows = folder, folder / f"{version}.npy", rows

    def load(self) -> np.ndarray | None:
        """The kept thresholds, or None when there are none for this version (or they do not fit the set)."""
        try:
            kept = np.load(self.path)
        except (OSError, ValueError):
            return None
        return kept if kept.shape == (self.rows,) and kept.dtype == np.float32 else None

    def save(self, thresholds: np.ndarray) -> None:
        """Keep them, replacing any other version's; a data dir that cannot be written to only costs the speed."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            part = self.path.with_suffix(".part.npy")
            np.save(part, thresholds.astype(np.float32))
            part.replace(self.path)
            for old in self.folder.glob("*.npy"):
                if old != self.path:
                    old.unlink()
        except OSError as exc:
            log.info("the set's thresholds were not kept (%s): the next call encodes the whole set again", exc)
