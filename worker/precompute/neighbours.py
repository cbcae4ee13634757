"""Nearest features by cosine similarity of their decoder directions."""

from __future__ import annotations

import torch


@torch.no_grad()
def decoder_neighbours(W_dec: torch.Tensor, n: int, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, cosines)``, each ``[d_sae, n]``, excluding the feature itself; rows computed in chunks."""
    w = torch.nn.functional.normalize(W_dec.float(), dim=1)
    d_sae = w.shape[0]
    n = min(n, d_sae - 1)
    indices = torch.empty(d_sae, n, dtype=torch.long, device=w.device)
    cosines = torch.empty(d_sae, n, dtype=torch.float32, device=w.device)
    for start in range(0, d_sae, chunk):
        sims = w[start : start + chunk] @ w.T
        rows = torch.arange(sims.shape[0], device=w.device)
        sims[rows, rows + start] = float("-inf")
        cos, idx = sims.topk(n, dim=1)
        indices[start : start + chunk], cosines[start : start + chunk] = idx, cos
    return indices, cosines
