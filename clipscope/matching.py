"""A feature of one SAE matched to the features of another SAE at the same hook site, by the cosine of
their dictionary atoms: do two recipes, sizes or seeds learn the same feature?

Two SAEs at the same site (same CLIP model and weights, same block) read and write the same
residual stream, so their atoms live in one space. A cosine near 1 says the other SAE has a feature
that writes the same direction; a best cosine near :func:`chance_level` (what the best of as many
random directions reaches: 0.17 for 49,152 atoms of width 768) says it has none.
"""

from __future__ import annotations

import math

import torch


def unit_atoms(W_dec: torch.Tensor) -> torch.Tensor:
    """``[d_sae, d_in]`` float32 rows of unit length (a zero atom stays zero)."""
    atoms = W_dec.detach().float()
    return atoms / atoms.norm(dim=1, keepdim=True).clamp(min=1e-12)


def best_matches(atom: torch.Tensor, atoms: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` rows of ``atoms`` (unit rows, :func:`unit_atoms`) with the largest cosine to ``atom``
    ``[d_in]``, as ``(index, cosine)``, best first."""
    if atom.shape != atoms.shape[1:]:
        raise ValueError(f"an atom of width {tuple(atom.shape)} cannot be matched to atoms of width {atoms.shape[1]}")
    cos = atoms @ (atom.float() / atom.float().norm().clamp(min=1e-12))
    value, index = cos.topk(min(k, len(cos)))
    return list(zip(index.tolist(), value.tolist()))


def chance_level(n: int, d: int) -> float:
    """About the largest cosine between a fixed direction and ``n`` random ones in ``d`` dimensions,
    ``sqrt(2 ln n / d)`` (each cosine is close to normal with variance ``1 / d``)."""
    return math.sqrt(2 * math.log(max(n, 2)) / d)
