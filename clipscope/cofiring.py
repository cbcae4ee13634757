"""Which features fire together: over the precompute images, the features that fire on the same
images as a given one.

A feature that fires almost only where another fires may be a split of it, or a part of what it
stands for; two that never fire together may divide one concept between them. The pairs are ranked
by Jaccard similarity of the image sets they fire on, ``|F and G| / |F or G|``, which a dense
feature (one that fires on everything) cannot top just by being everywhere; both conditional
shares are given beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clipscope.activation_cache import ActivationCache
from clipscope.sae.model import TopKSAE
from clipscope.token_maps import per_image_entries


def _ranges(offsets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Positions ``offsets[r] .. offsets[r + 1]`` of every row in ``rows``, concatenated."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    firsts = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(starts - firsts, lengths) + torch.arange(int(lengths.sum()))


@dataclass
class FiringTable:
    """Which features fire on which images, both ways (sorted CSR by image and by feature)."""

    n_images: int
    d_sae: int
    image_offsets: torch.Tensor
    image_features: torch.Tensor
    feature_offsets: torch.Tensor
    feature_images: torch.Tensor

    @classmethod
    def from_entries(cls, images: torch.Tensor, features: torch.Tensor, n_images: int, d_sae: int) -> FiringTable:
        """From one entry per (image, feature) that fires."""
        by_image = torch.argsort(images * d_sae + features)
        by_feature = torch.argsort(features * n_images + images)
        return cls(n_images, d_sae,
                   torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(images, minlength=n_images).cumsum(0)]),
                   features[by_image],
                   torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(features, minlength=d_sae).cumsum(0)]),
                   images[by_feature])

    @classmethod
    def from_cache(cls, sae: TopKSAE, cache: ActivationCache, limit: int | None = None, batch: int = 256) -> FiringTable:
        """The SAE's firing entries over the first ``limit`` images of an activation cache (all by default),
        encoded on the SAE's device and kept on the CPU; an image fires a feature where any of its tokens does."""
        acts, t = cache.activations(), cache.tokens_per_image
        n = cache.n_images if limit is None else min(limit, cache.n_images)
        device = sae.encoder_weight.device
        images, features = [], []
        with torch.no_grad():
            for start in range(0, n, batch):
                end = min(n, start + batch)
                x = torch.from_numpy(np.asarray(acts[start:end], dtype=np.float32).reshape(-1, cache.d)).to(device)
                code = sae.encode(x)
                img, feat, _ = per_image_entries(code.indices, code.values, torch.arange(start, end, device=device), t, sae.d_sae)
                images.append(img.cpu())
                features.append(feat.cpu())
        return cls.from_entries(torch.cat(images).long(), torch.cat(features).long(), n, sae.d_sae)

    def fires_on(self, feature: int) -> int:
        """How many of the images ``feature`` fires on."""
        return int(self.feature_offsets[feature + 1] - self.feature_offsets[feature])

    def partners(self, feature: int, k: int = 8) -> list[dict[str, float | int]]:
        """The ``k`` other features whose image sets are most alike ``feature``'s (Jaccard), each with
        ``together`` (images both fire on), ``jaccard``, ``of_this`` (the share of this feature's images
        the other fires on) and ``of_that`` (the share of the other's images this one fires on)."""
        mine = self.feature_images[_ranges(self.feature_offsets, torch.tensor([feature]))]
        if not len(mine):
            return []
        together = torch.bincount(self.image_features[_ranges(self.image_offsets, mine)], minlength=self.d_sae)
        together[feature] = 0
        sizes = self.feature_offsets[1:] - self.feature_offsets[:-1]
        jaccard = together / (len(mine) + sizes - together).clamp(min=1)
        order = torch.argsort(together, descending=True, stable=True)  # ties of Jaccard: more images together first
        order = order[torch.argsort(jaccard[order], descending=True, stable=True)][:k]
        return [{"index": int(g), "together": int(together[g]), "jaccard": float(jaccard[g]), "of_this": float(together[g] / len(mine)),
                 "of_that": float(together[g] / sizes[g])} for g in order.tolist() if together[g] > 0]
