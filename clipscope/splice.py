"""CLIP with the SAE spliced in at the hook site.

The prefix (embedding and blocks ``0..layer``) runs once; each condition edits only the token
positions the SAE was trained on and runs the rest of the tower unchanged:

* ``clean`` - nothing replaced;
* ``spliced`` - the SAE's reconstruction ``x_hat`` replaces ``x``;
* ``spliced_error`` - ``x_hat + (x - x_hat)``: must reproduce the clean output, which proves the
  splice sits where it claims (:func:`check_error_splice` fails loudly otherwise);
* ``mean_ablation`` - the tokens replaced by their mean over the SAE's training activations.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from clipscope.clip.hooks import continue_from, residual_at, token_slice
from clipscope.errors import ClipScopeError
from clipscope.sae.model import TopKSAE

Condition = Literal["clean", "spliced", "spliced_error", "mean_ablation"]
CONDITIONS: tuple[Condition, ...] = ("clean", "spliced", "spliced_error", "mean_ablation")


@torch.no_grad()
def spliced_features(
    visual: torch.nn.Module,
    sae: TopKSAE,
    images: torch.Tensor,
    layer: int,
    tokens: str,
    conditions: Sequence[Condition] = CONDITIONS,
    mean: torch.Tensor | None = None,
    resid: torch.Tensor | None = None,
) -> dict[Condition, torch.Tensor]:
    """Projected image embeddings ``[batch, embed_dim]`` under each condition.

    ``mean`` is ``[positions, d]`` (per selected position) and is needed for ``mean_ablation``;
    ``resid``, the images' residual stream after block ``layer`` when the caller has it already.
    """
    resid = residual_at(visual, images, layer) if resid is None else resid
    select = token_slice(tokens)
    x = resid[:, select]
    b, t, d = x.shape
    flat = x.reshape(b * t, d).float()
    x_hat = None
    if any(c in ("spliced", "spliced_error") for c in conditions):
        x_hat, _ = sae(flat)
    out: dict[Condition, torch.Tensor] = {}
    for condition in conditions:
        if condition == "clean":
            out[condition] = continue_from(visual, resid, layer)
            continue
        if condition == "spliced":
            new = x_hat
        elif condition == "spliced_error":
            new = x_hat + (flat - x_hat)
        elif condition == "mean_ablation":
            if mean is None:
                raise ValueError("mean_ablation needs the training-activation mean")
            new = mean.to(flat).expand(b, t, d).reshape(b * t, d)
        else:
            raise ValueError(f"unknown condition {condition!r}")
        edited = resid.clone()
        edited[:, select] = new.reshape(b, t, d).to(resid.dtype)
        out[condition] = continue_from(visual, edited, layer)
    return out


def check_error_splice(clean_logits: torch.Tensor, error_logits: torch.Tensor, rtol: float = 1e-4) -> float:
    """Relative max difference between clean and spliced+error logits; raises above ``rtol``."""
    diff = float((clean_logits - error_logits).abs().max() / clean_logits.abs().max().clamp_min(1e-12))
    if diff > rtol:
        raise ClipScopeError(
            f"Splice check failed: reconstruction + error differs from clean CLIP by {diff:.2e} (relative) > {rtol:.0e}; "
            "the SAE is not spliced where its activations were taken (layer, tokens or preprocessing differ)."
        )
    return diff
