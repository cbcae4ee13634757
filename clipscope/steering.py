"""Edit SAE features in one image's residual stream and read CLIP's zero-shot prediction after the edit.

With the SAE at the hook site the stream at the SAE's tokens is ``x = sum_f a_f W_dec[f] + b_dec + e``.
An edit changes some features' activations ``a_f -> a'_f`` and adds ``(a'_f - a_f) W_dec[f]`` to the
stream, the SAE's error kept, so an edit that changes nothing is clean CLIP exactly; the rest of the
tower then runs on the edited stream. Setting a feature to zero removes it (what
:mod:`clipscope.attribution` measures one feature at a time); scaling it up or setting a feature that
does not fire asks what CLIP would predict if the image showed more of the feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipscope.clip.hooks import continue_from, token_slice
from clipscope.clip.zeroshot import zero_shot_logits
from clipscope.sae.model import SparseCode, TopKSAE


@dataclass(frozen=True)
class Edit:
    """One feature's new activation."""

    feature: int
    value: float
    scale: bool = False
    """False: the feature's activation becomes ``value`` at every token the SAE reads (the CLS token for
    a CLS SAE), firing or not; True: its activation is multiplied by ``value`` where it fires."""


@dataclass
class Steering:
    """One image's zero-shot prediction over ``classes``, clean and after the edits."""

    classes: list[str]
    edits: list[Edit]
    clean: torch.Tensor
    """``[classes]`` probabilities of clean CLIP."""
    steered: torch.Tensor
    """``[classes]`` probabilities with the edits applied."""
    logit_change: torch.Tensor
    """``[classes]`` each class's logit after the edits minus before."""
    before: list[float]
    """Each edited feature's activation on the image (its largest over the SAE's tokens)."""
    after: list[float]
    """The same after the edit."""


def activation_per_token(code: SparseCode, features: torch.Tensor) -> torch.Tensor:
    """``[len(features), tokens]``: each feature's activation on each token of ``code`` (zero where it does not fire)."""
    hit = code.indices[None] == features.to(code.indices.device)[:, None, None]  # [m, t, k]
    return (code.values.float()[None] * hit).sum(-1)


def edited_activations(code: SparseCode, edits: list[Edit]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(before, after)``, each ``[len(edits), tokens]``: the edited features' activations per token, then as edited."""
    features = torch.tensor([e.feature for e in edits], dtype=torch.long, device=code.indices.device)
    before = activation_per_token(code, features)
    value = torch.tensor([e.value for e in edits], dtype=before.dtype, device=before.device)[:, None]
    scale = torch.tensor([e.scale for e in edits], device=before.device)[:, None]
    return before, torch.where(scale, before * value, value.expand_as(before))


def check_question(resid: torch.Tensor, classifier: torch.Tensor, classes: list[str], what: str) -> None:
    """One image's stream and a classifier with a column per class, or a ValueError naming ``what`` was asked."""
    if resid.shape[0] != 1:
        raise ValueError(f"{what} takes one image's residual stream")
    if not 0 < len(classes) == classifier.shape[1]:
        raise ValueError("the classifier needs one column per class, and at least one class")


def steer(
    model: torch.nn.Module,
    sae: TopKSAE,
    resid: torch.Tensor,
    layer: int,
    tokens: str,
    classifier: torch.Tensor,
    classes: list[str],
    edits: list[Edit],
) -> Steering:
    """Apply ``edits`` to one image's residual stream ``resid`` ``[1, positions, width]`` after block
    ``layer`` and read the zero-shot prediction over ``classifier`` ``[embed_dim, classes]``, clean and edited."""
    check_question(resid, classifier, classes, "steer")
    if not edits:
        raise ValueError("steer needs at least one edit")
    if bad := [e.feature for e in edits if not 0 <= e.feature < sae.d_sae]:
        raise ValueError(f"feature {bad[0]} is outside 0..{sae.d_sae - 1}")
    if len({e.feature for e in edits}) < len(edits):
        raise ValueError("each feature may be edited once")
    select = token_slice(tokens)
    with torch.no_grad():
        code = sae.encode(resid[0, select].float())
        before, after = edited_activations(code, edits)
        atoms = sae.W_dec.detach().float()[[e.feature for e in edits]]  # [m, width]
        edited = resid.clone()
        edited[0, select] = (resid[0, select].float() + (after - before).T @ atoms).to(resid.dtype)
        logits = zero_shot_logits(model, continue_from(model.visual, torch.cat([resid, edited]), layer), classifier)
    return Steering(list(classes), list(edits), logits[0].softmax(-1).cpu(), logits[1].softmax(-1).cpu(), (logits[1] - logits[0]).cpu(),
                    before.max(1).values.tolist(), after.max(1).values.tolist())
