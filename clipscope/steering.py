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
from clipscope.feature_edits import Edit
from clipscope.sae.model import SparseCode, TopKSAE


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
    values = code.values.float()
    return torch.stack([(values * (code.indices == f)).sum(-1) for f in features.tolist()])  # one [t, k] mask at a time


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
    code: SparseCode | None = None,
) -> Steering:
    """Apply ``edits`` to one image's residual stream ``resid`` ``[1, positions, width]`` after block
    ``layer`` and read the zero-shot prediction over ``classifier`` ``[embed_dim, classes]``, clean and edited.
    ``code``: the SAE's code of the stream's tokens, when the caller has it (:func:`edit_stream`)."""
    check_question(resid, classifier, classes, "steer")
    with torch.no_grad():
        edited, before, after = edit_stream(sae, resid, tokens, edits, code)
        logits = zero_shot_logits(model, continue_from(model.visual, torch.cat([resid, edited]), layer, edited_at=token_slice(tokens)), classifier)
    return Steering(list(classes), list(edits), logits[0].softmax(-1).cpu(), logits[1].softmax(-1).cpu(), (logits[1] - logits[0]).cpu(),
                    before[0].tolist(), after[0].tolist())


def edit_stream(sae: TopKSAE, resid: torch.Tensor, tokens: str, edits: list[Edit], code: SparseCode | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``resid`` ``[batch, positions, width]`` with ``edits`` applied at the SAE's tokens of every image,
    and each edited feature's activation per image before and after the edit (its largest over the
    tokens), ``[batch, len(edits)]`` each. ``code``: the SAE's code of those tokens (``[batch * tokens]``
    rows, row-major), when the caller has it."""
    if not edits:
        raise ValueError("an edit of the stream needs at least one edit")
    if bad := [e.feature for e in edits if not 0 <= e.feature < sae.d_sae]:
        raise ValueError(f"feature {bad[0]} is outside 0..{sae.d_sae - 1}")
    if len({e.feature for e in edits}) < len(edits):
        raise ValueError("each feature may be edited once")
    select = token_slice(tokens)
    x = resid[:, select].float()
    b, t, d = x.shape
    before, after = edited_activations(code if code is not None else sae.encode(x.reshape(b * t, d)), edits)  # [m, b * t]
    atoms = sae.W_dec.detach().float()[[e.feature for e in edits]]  # [m, width]
    edited = resid.clone()
    edited[:, select] = (x + ((after - before).T @ atoms).view(b, t, d)).to(resid.dtype)
    return edited, before.view(-1, b, t).amax(2).T, after.view(-1, b, t).amax(2).T
