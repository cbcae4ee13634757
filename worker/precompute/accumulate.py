"""Streaming accumulators over sparse (image, feature, activation) entries.

Memory is bounded by the number of features times the slots kept, never by images x features.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


class GroupTopK:
    """For each of ``n_groups`` groups, the ``k`` entries with the highest score seen so far.

    Each entry carries an int64 ``payload`` (an image row), a float ``value`` and, when ``extra`` > 0,
    ``extra`` bytes (``self.extra``: an image's token map). Ties between equal scores go to the
    entry seen first, so results are deterministic.
    """

    def __init__(self, n_groups: int, k: int, device: str | torch.device = "cpu", extra: int = 0):
        self.k = k
        self.scores = torch.full((n_groups, k), float("-inf"), dtype=torch.float64, device=device)
        self.payload = torch.full((n_groups, k), -1, dtype=torch.long, device=device)
        self.values = torch.zeros((n_groups, k), dtype=torch.float32, device=device)
        self.extra = torch.zeros((n_groups, k, extra), dtype=torch.uint8, device=device) if extra else None

    def entering(self, groups: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Which entries could enter their group's top k now (an equal score loses to the one kept)."""
        return scores.double() > self.scores[groups, -1]

    def holds(self, groups: torch.Tensor, scores: torch.Tensor, payload: torch.Tensor) -> torch.Tensor:
        """Which entries are kept: their group holds their payload (a payload appears once in a group).

        A kept entry scores at least its group's k-th kept score, so only the entries that do are looked
        up: in the precompute's second pass ~4,000 of a batch's 256,000 entries, where ``torch.isin``
        over every entry's (feature, image) key took 31 ms a batch (4.5 s of 65 s at the Food-101 size).
        """
        held = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
        maybe = (scores.double() >= self.scores[groups, -1]).nonzero().squeeze(1)
        held[maybe] = (self.payload[groups[maybe]] == payload[maybe, None]).any(1)
        return held

    @torch.no_grad()
    def update(
        self, groups: torch.Tensor, scores: torch.Tensor, payload: torch.Tensor, values: torch.Tensor, extra: torch.Tensor | None = None
    ) -> None:
        # An entry enters its group's top k only by beating the k-th score kept so far (an equal score
        # loses to the entry seen first), so the rest are dropped before the sorts: once the groups
        # fill up, that is nearly every entry.
        if (extra is None) != (self.extra is None):
            raise ValueError("extra bytes must be given exactly when the accumulator keeps them")
        scores = scores.double()
        entering = self.entering(groups, scores)
        groups, scores, payload, values = groups[entering], scores[entering], payload[entering], values[entering]
        if groups.numel() == 0:
            return
        k = self.k
        touched = torch.unique(groups)
        all_g = torch.cat([touched.repeat_interleave(k), groups])
        all_s = torch.cat([self.scores[touched].flatten(), scores])
        all_p = torch.cat([self.payload[touched].flatten(), payload])
        all_v = torch.cat([self.values[touched].flatten(), values.float()])
        order = torch.argsort(all_s, descending=True, stable=True)
        order = order[torch.argsort(all_g[order], stable=True)]
        g_sorted = all_g[order]
        first = torch.searchsorted(g_sorted, g_sorted, side="left")
        rank = torch.arange(len(g_sorted), device=g_sorted.device) - first
        keep = rank < k
        sel, g_keep, r_keep = order[keep], g_sorted[keep], rank[keep]
        if self.extra is not None:  # gathered before the kept slots are overwritten below
            all_e = torch.cat([self.extra[touched].flatten(0, 1), extra[entering]])
            self.extra[g_keep, r_keep] = all_e[sel]
        self.scores[g_keep, r_keep] = all_s[sel]
        self.payload[g_keep, r_keep] = all_p[sel]
        self.values[g_keep, r_keep] = all_v[sel]


class FeatureStats:
    """Per-feature firing count, activation sum and maximum."""

    def __init__(self, d_sae: int, device: str | torch.device = "cpu"):
        self.count = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.total = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max = torch.zeros(d_sae, dtype=torch.float32, device=device)

    @torch.no_grad()
    def update(self, features: torch.Tensor, values: torch.Tensor) -> None:
        self.count.index_add_(0, features, torch.ones_like(features))
        self.total.index_add_(0, features, values.double())
        self.max.scatter_reduce_(0, features, values.float(), reduce="amax")


class ClassCounts:
    """Per feature and dataset class: the images it fires on and their activation sum (pass 2).

    Dense ``[d_sae, classes]`` (12 bytes a cell: 60 MB for Food-101's 101 classes at 49,152 features).
    """

    def __init__(self, labels: torch.Tensor, n_classes: int, d_sae: int, device: str | torch.device = "cpu"):
        self.labels = labels.to(device)
        self.n_classes = n_classes
        self.class_sizes = torch.bincount(labels[labels >= 0], minlength=n_classes).to(device)
        self.count = torch.zeros(d_sae * n_classes, dtype=torch.int32, device=device)
        self.total = torch.zeros(d_sae * n_classes, dtype=torch.float64, device=device)

    MAX_CELLS = 200_000_000
    """About 2.4 GB; beyond it (e.g. 4,000+ classes at 49,152 features) the breakdown is skipped."""

    @classmethod
    def for_labels(cls, labels: torch.Tensor, d_sae: int, device: str | torch.device = "cpu") -> "ClassCounts | None":
        """None when no image has a class, or when the table would not fit ``MAX_CELLS``."""
        n_classes = int(labels.max()) + 1 if len(labels) else 0
        if n_classes * d_sae > cls.MAX_CELLS:
            log.warning("per-class counts skipped: %d classes x %d features is over %d cells", n_classes, d_sae, cls.MAX_CELLS)
            return None
        return cls(labels, n_classes, d_sae, device) if n_classes > 0 else None

    @torch.no_grad()
    def update(self, images: torch.Tensor, features: torch.Tensor, values: torch.Tensor) -> None:
        label = self.labels[images]
        known = label >= 0
        cell = features[known] * self.n_classes + label[known]
        self.count.index_add_(0, cell, torch.ones_like(cell, dtype=torch.int32))
        self.total.index_add_(0, cell, values[known].double())

    def top(self, k: int, names: list[str], n_active: torch.Tensor) -> list[list[dict]]:
        """Per feature, the ``k`` classes holding most of its firing images (ties: lower class index first);
        shares are of all ``n_active`` images it fires on, unlabelled ones included."""
        count = self.count.view(-1, self.n_classes).long()
        total = self.total.view(-1, self.n_classes)
        fired = n_active.tolist()
        k = min(k, self.n_classes)
        order = torch.argsort(-count, dim=1, stable=True)[:, :k]
        top_count, top_total = count.gather(1, order).tolist(), total.gather(1, order).tolist()
        sizes = self.class_sizes.tolist()
        out = []
        for f, classes in enumerate(order.tolist()):
            out.append([
                {"label": c, "name": names[c] if c < len(names) else str(c), "count": n, "share": n / fired[f],
                 "of_class": n / sizes[c], "mean": t / n}
                for c, n, t in zip(classes, top_count[f], top_total[f]) if n > 0
            ])
        return out


def sample_priority(image_rows: np.ndarray, features: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic pseudo-random priority per (image, feature): keeping the k highest is a seeded uniform sample."""
    x = (image_rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (features.astype(np.uint64) + np.uint64(seed) * np.uint64(0xBF58476D1CE4E5B9))
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def log_histogram(features: torch.Tensor, values: torch.Tensor, maxima: torch.Tensor, bins: int, ratio: float):
    """Bin index per entry in log-spaced bins from ``max / ratio`` to ``max`` (-1 = below the first edge)."""
    lo = maxima[features].double() / ratio
    values = values.double()
    pos = torch.log(values / lo) / np.log(ratio) * bins
    idx = pos.floor().long().clamp(max=bins - 1)
    return torch.where(values < lo, torch.full_like(idx, -1), idx)
