"""Which SAE features one image's zero-shot prediction rests on.

CLIP classifies an image by the cosine of its embedding with each class's text embedding. With the
SAE at the hook site the residual stream ``x`` at the SAE's tokens is its reconstruction plus an
error, ``x = sum_f a_f W_dec[f] + b_dec + e``, so *removing* feature ``f`` means
``x -> x - a_f W_dec[f]`` at every token where it fires, the error kept: removing nothing is clean
CLIP exactly, and the change of the target class's logit is the feature's causal effect on it.

Every firing feature gets a first-order estimate from one backward pass (attribution patching:
``-a_f W_dec[f] . dlogit/dx``); the ``exact`` features with the largest estimates are then measured
by running the rest of the tower on each edited stream, in one batch. With a contrast class the
quantity explained is the target's logit minus the contrast's: why CLIP says one rather than the other.
Over a labelled set, :class:`ClassSupport` sums the same first-order supports per class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipscope.clip.hooks import continue_from, token_slice
from clipscope.clip.zeroshot import zero_shot_logits
from clipscope.sae.model import SparseCode, TopKSAE
from clipscope.steering import activation_per_token, check_question


@dataclass
class FeatureEffect:
    """What removing one feature from the image's residual stream does to the prediction."""

    index: int
    activation: float
    """The feature's activation on the image (its largest over the SAE's tokens)."""
    estimate: float
    """First-order estimate of ``logit_change`` (gradient times the removed vector)."""
    logit_change: float
    """The explained quantity with the feature removed minus without: negative where the feature supports
    the target (its logit, or with a contrast class its margin over that class's logit)."""
    probability: float
    """The target class's probability with the feature removed."""
    top_class: int
    """The class CLIP predicts with the feature removed."""


@dataclass
class Explanation:
    """One image's zero-shot prediction over ``classes`` and the features it rests on."""

    classes: list[str]
    clean: torch.Tensor
    """``[classes]`` probabilities of clean CLIP."""
    spliced: torch.Tensor
    """``[classes]`` probabilities with the SAE's reconstruction in place of the stream (error dropped)."""
    target: int
    """The class explained: clean CLIP's top class unless one was asked for."""
    contrast: int | None
    """With a contrast class, what is explained is the target's logit minus the contrast's ("why
    the target rather than the contrast"); else the target's logit."""
    estimates: dict[int, float]
    """Every firing feature's first-order ``logit_change`` estimate."""
    effects: list[FeatureEffect]
    """The measured features, most supporting (lowest ``logit_change``) first."""


def explain(
    model: torch.nn.Module,
    sae: TopKSAE,
    resid: torch.Tensor,
    layer: int,
    tokens: str,
    classifier: torch.Tensor,
    classes: list[str],
    target: int | None = None,
    exact: int = 24,
    contrast: int | None = None,
    code: SparseCode | None = None,
) -> Explanation:
    """Explain one image from its residual stream ``resid`` ``[1, positions, width]`` after block ``layer``.

    ``classifier`` is ``[embed_dim, classes]`` (``build_classifier``); ``exact`` bounds how many
    features are measured by running the tower (the rest keep their estimate only). ``code``: the SAE's
    code of the stream's tokens (``sae.encode(resid[0, tokens])``), when the caller has it.
    """
    check_question(resid, classifier, classes, "explain")
    visual, select = model.visual, token_slice(tokens)
    with torch.no_grad():
        code = code if code is not None else sae.encode(resid[0, select].float())
        x_hat = sae.decode(code)
        spliced = resid.clone()
        spliced[0, select] = x_hat.to(resid.dtype)
        clean_logits, spliced_logits = zero_shot_logits(model, continue_from(visual, torch.cat([resid, spliced]), layer, edited_at=select), classifier)
    target = int(clean_logits.argmax()) if target is None else target
    for name, c in (("target", target), ("contrast", contrast)):
        if c is not None and not 0 <= c < len(classes):
            raise ValueError(f"{name} class {c} is outside 0..{len(classes) - 1}")
    if contrast == target:
        raise ValueError("the contrast class must differ from the target class")
    weight = torch.zeros(len(classes), device=clean_logits.device)  # the explained quantity: logits @ weight
    weight[target] = 1.0
    if contrast is not None:
        weight[contrast] = -1.0

    support = first_order_support(model, sae, resid, layer, tokens, classifier, weight[None], code)
    with torch.no_grad():
        estimate = torch.zeros(sae.d_sae, dtype=torch.float64, device=support.device)
        estimate.index_add_(0, code.indices.flatten(), -support.flatten().double())  # removing a feature takes its support away
        firing = torch.unique(code.indices[code.values > 0])
        estimates = dict(zip(firing.tolist(), estimate[firing].tolist()))
        chosen = firing[estimate[firing].abs().argsort(descending=True, stable=True)[:exact]]
        effects = _measure(model, sae, resid, layer, select, code, chosen, classifier, target, weight, clean_logits @ weight)
    for e in effects:
        e.estimate = estimates[e.index]
    effects.sort(key=lambda e: (e.logit_change, e.index))
    return Explanation(list(classes), clean_logits.softmax(-1).cpu(), spliced_logits.softmax(-1).cpu(), target, contrast, estimates, effects)


def first_order_support(model: torch.nn.Module, sae: TopKSAE, resid: torch.Tensor, layer: int, tokens: str, classifier: torch.Tensor,
                        weight: torch.Tensor, code: SparseCode, chunk: int = 1024) -> torch.Tensor:
    """``[batch * tokens, k]``: each entry of ``code`` (the SAE's code of ``resid`` ``[batch, positions,
    width]`` at its tokens, row-major) times the slope of its image's ``logits @ weight[image]`` along
    its atom: ``a_f W_dec[f] . d(logits @ w)/dx``, the first-order share of that quantity the entry
    carries. One backward pass for the batch (images do not interact); ``weight`` is ``[batch, classes]``."""
    select = token_slice(tokens)
    with torch.enable_grad():
        stream = resid.detach().clone().requires_grad_(True)
        quantity = (zero_shot_logits(model, continue_from(model.visual, stream, layer), classifier) * weight).sum()
        (grad,) = torch.autograd.grad(quantity, stream)
    g = grad[:, select].float().reshape(-1, grad.shape[-1])  # [batch * tokens, width]
    with torch.no_grad():
        return code.values.float() * slopes_along(g, sae.W_dec.detach().float(), code.indices, chunk)


def slopes_along(g: torch.Tensor, atoms: torch.Tensor, indices: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``[rows, k]``: ``g[r] . atoms[indices[r, j]]``. For few slots (at most half as many as atoms: one
    explained image's 500) only their atoms are read and multiplied; for many (an evaluation batch's),
    each row's slopes along every atom, ``[chunk, d_sae]`` at a time, then the slots': a dense product
    streams the atoms once where gathering them would read most of them several times. One image at
    49,152 atoms: 13 -> 0.3 ms on 2 CPU threads (docs/benchmarks.md)."""
    if indices.numel() * 2 <= atoms.shape[0]:
        return torch.bmm(atoms[indices], g[:, :, None]).squeeze(2)
    return torch.cat([(g[lo : lo + chunk] @ atoms.T).gather(1, indices[lo : lo + chunk]) for lo in range(0, len(g), chunk)])


def _measure(model, sae: TopKSAE, resid, layer: int, select: slice, code, chosen: torch.Tensor, classifier, target: int,
             weight: torch.Tensor, clean: torch.Tensor, chunk: int = 32) -> list[FeatureEffect]:
    """Each ``chosen`` feature removed from its own copy of the stream, the rest of the tower run on
    ``chunk`` copies at a time (``estimate`` left for the caller)."""
    out = []
    for start in range(0, len(chosen), chunk):
        feats = chosen[start : start + chunk]
        amount = activation_per_token(code, feats)  # [m, t]
        edited = resid.expand(len(feats), -1, -1).clone()
        removed = amount[:, :, None] * sae.W_dec.float()[feats][:, None, :]  # [m, t, width]
        edited[:, select] = (edited[:, select].float() - removed).to(resid.dtype)
        logits = zero_shot_logits(model, continue_from(model.visual, edited, layer, edited_at=select), classifier)
        probs, change = logits.softmax(-1), logits @ weight - clean
        for i, f in enumerate(feats.tolist()):
            out.append(FeatureEffect(f, float(amount[i].max()), 0.0, float(change[i]), float(probs[i, target]), int(logits[i].argmax())))
    return out


class ClassSupport:
    """Over a labelled set: per class, each feature's mean first-order support for the class's
    centred logit (its logit minus the mean over classes, which moves no probability when shared)
    on the class's own images: which features CLIP's recognition of each class rests on."""

    MAX_CELLS = 100_000_000
    """Classes x features kept as float64 sums (800 MB); beyond it (e.g. 2,000+ classes at 49,152
    features) the tallies are skipped."""

    def __init__(self, n_classes: int, d_sae: int, device: str | torch.device):
        self.n_classes, self.d_sae = n_classes, d_sae
        self.total = torch.zeros(n_classes * d_sae, dtype=torch.float64, device=device)
        self.images = torch.zeros(n_classes, dtype=torch.long, device=device)

    @classmethod
    def for_classes(cls, n_classes: int, d_sae: int, device) -> ClassSupport | None:
        return cls(n_classes, d_sae, device) if 0 < n_classes * d_sae <= cls.MAX_CELLS else None

    def add(self, model: torch.nn.Module, sae: TopKSAE, resid: torch.Tensor, layer: int, tokens: str, classifier: torch.Tensor,
            labels: torch.Tensor) -> None:
        """One batch: ``resid`` ``[batch, positions, width]`` after block ``layer``, ``labels`` ``[batch]``."""
        select = token_slice(tokens)
        with torch.no_grad():
            x = resid[:, select].float()
            code = sae.encode(x.reshape(-1, x.shape[-1]))
            weight = torch.nn.functional.one_hot(labels, self.n_classes).float() - 1.0 / self.n_classes
        support = first_order_support(model, sae, resid, layer, tokens, classifier, weight, code)
        with torch.no_grad():
            per_token = x.shape[1]
            owner = labels.repeat_interleave(per_token)[:, None].expand_as(code.indices)  # each entry's image's class
            self.total.index_add_(0, (owner * self.d_sae + code.indices).flatten(), support.flatten().double())
            self.images += torch.bincount(labels, minlength=self.n_classes)

    def top(self, k: int) -> list[list[list[float]]]:
        """Per class, its ``k`` most supporting features as ``[feature, mean support]``, best first (none without images)."""
        mean = self.total.view(self.n_classes, self.d_sae) / self.images.clamp(min=1)[:, None]
        value, index = mean.topk(min(k, self.d_sae), dim=1)
        return [[[int(f), round(float(v), 6)] for f, v in zip(fs, vs) if v > 0] if n else []
                for fs, vs, n in zip(index.tolist(), value.tolist(), self.images.tolist())]
