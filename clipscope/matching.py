"""A feature of one SAE matched to the features of another SAE at the same hook site, by the cosine of
their dictionary atoms: do two recipes, sizes or seeds learn the same feature?

Two SAEs at the same site (same CLIP model and weights, same block) read and write the same
residual stream, so their atoms live in one space. A cosine near 1 says the other SAE has a feature
that writes the same direction; a best cosine near :func:`clipscope.overlap_rows.chance_level` (what the best of as many
random directions reaches: 0.17 for 49,152 atoms of width 768) says it has none.
"""

from __future__ import annotations

import torch

from clipscope import gemm


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


SHARED_AT = (0.5, 0.7, 0.9)
"""Cosines at which a feature counts as shared with another SAE (0.9: nearly the same atom)."""


TILE = 8192
"""Columns of one cosine product taken at a time (here and in the precompute's neighbour search): with
blocks of 2,048 rows, 64 MiB of fp32 cosines, however many atoms there are."""


@torch.no_grad()
def best_cosines(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """For unit rows ``a`` ``[n_a, d]`` and ``b`` ``[n_b, d]`` (:func:`unit_atoms`): each row's largest cosine
    to any row of the other, ``([n_a], [n_b])``, from one product taken ``chunk`` rows of ``a`` by ``tile``
    rows of ``b`` at a time (64 MiB of cosines at most), through :func:`clipscope.gemm.linear`."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"atoms of width {a.shape[1]} cannot be matched to atoms of width {b.shape[1]}")
    best_a = torch.full((len(a),), -1.0, device=a.device)
    best_b = torch.full((len(b),), -1.0, device=a.device)
    if not len(a) or not len(b):
        return best_a.cpu(), best_b.cpu()
    b = b.contiguous()
    for lo in range(0, len(a), chunk):
        rows = a[lo : lo + chunk]
        for col in range(0, len(b), tile):
            cos = gemm.linear(rows, b[col : col + tile], None)
            torch.maximum(best_a[lo : lo + chunk], cos.amax(dim=1), out=best_a[lo : lo + chunk])
            torch.maximum(best_b[col : col + tile], cos.amax(dim=0), out=best_b[col : col + tile])
    return best_a.cpu(), best_b.cpu()


def overlap_summary(best: torch.Tensor, chance: float, bins: int = 20) -> dict:
    """What share of one SAE's features another SAE has too: their best cosines (:func:`best_cosines`) on
    ``bins`` bins from 0 to 1 (a negative best counts in the first), their median, the share at or above each
    of :data:`SHARED_AT`, and the other dictionary's chance level."""
    best = best.float()
    counts = torch.histc(best.clamp(0, 1), bins=bins, min=0, max=1).round().long().tolist() if len(best) else [0] * bins
    return {
        "features": len(best), "median": float(best.median()) if len(best) else None, "bins": bins, "counts": counts,
        "shared": {f"{t:g}": float((best >= t).float().mean()) if len(best) else None for t in SHARED_AT}, "chance": chance,
    }
