"""Where on an image a feature fires: its activation on each token an SAE reads.

An SAE over the ``patches`` or ``all`` tokens codes every token of an image, and an image's
activation of a feature is its maximum over them. The per-token values (a *token map*) show where
in the image the feature fires. ViT-B/32 at 224 x 224 has 7 x 7 patches in row-major order after
the CLS token; in ``all`` mode the map's first value is the CLS token's, which has no place.

Stored maps are one byte per token, the fraction of the image's activation
(``round(255 * value / activation)``, :func:`quantise`): a heatmap needs no more, and a feature's
twelve top images cost 12 x 49 bytes. This module computes them (torch); :mod:`clipscope.veils`
reads them back and draws them, without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from clipscope.sae.model import TopKSAE


@dataclass
class TokenValues:
    """A batch's firing (token, feature) codes, each pointing at its (image, feature) entry: enough to
    build the token map of any entry without building them all."""

    entry: torch.Tensor
    token: torch.Tensor
    value: torch.Tensor
    n_entries: int
    tokens_per_image: int

    def maps(self, selected: torch.Tensor | None = None) -> torch.Tensor:
        """``[entries, tokens_per_image]`` (only the ``selected`` entries, a bool mask, when given): each
        entry's activation on every token of its image, 0 where the feature did not fire."""
        entry, token, value = self.entry, self.token, self.value
        n = self.n_entries
        if selected is not None:
            position = torch.full((self.n_entries,), -1, dtype=torch.long, device=entry.device)
            n = int(selected.sum())
            position[selected] = torch.arange(n, device=entry.device)
            entry = position[entry]
            kept = entry >= 0
            entry, token, value = entry[kept], token[kept], value[kept]
        out = torch.zeros(n, self.tokens_per_image, dtype=value.dtype, device=value.device)
        out[entry, token] = value  # a token's code names each feature once, so no two writes meet
        return out


def per_image_entries(indices: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, tokens_per_image: int, d_sae: int, maps: bool = False):
    """Sparse codes of ``len(rows) * tokens_per_image`` vectors -> firing entries per image.

    An image's activation of a feature is its maximum over the image's tokens. Returns
    ``(image_rows, features, values)`` with values > 0, one entry per (image, feature), and with
    ``maps`` a fourth item, the :class:`TokenValues` that build the entries' token maps.
    """
    t = tokens_per_image
    img = rows.repeat_interleave(t)[:, None].expand_as(indices)
    fired = values > 0
    img, feat, val = img[fired], indices[fired], values[fired]
    token = torch.arange(len(rows) * t, device=val.device).remainder(t)[:, None].expand_as(indices)[fired] if maps else None
    if t == 1:
        return (img, feat, val, TokenValues(torch.arange(len(val), device=val.device), token, val, len(val), 1)) if maps else (img, feat, val)
    key = img * d_sae + feat
    uniq, inverse = torch.unique(key, return_inverse=True)
    best = torch.zeros(len(uniq), dtype=val.dtype, device=val.device).scatter_reduce_(0, inverse, val, reduce="amax", include_self=False)
    if not maps:
        return uniq // d_sae, uniq % d_sae, best
    return uniq // d_sae, uniq % d_sae, best, TokenValues(inverse, token, val, len(uniq), t)


def firing_entries(sae: "TopKSAE", x: torch.Tensor, maps: bool, code=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``per_image_entries`` of ``[images, tokens, d]`` SAE inputs, on the CPU; with ``maps``, also
    their token maps when the SAE reads several tokens (else None). ``code``: the inputs' code, when the
    caller has encoded them (``sae.encode`` of the ``[images * tokens, d]`` rows)."""
    b, t, d = x.shape
    code = code if code is not None else sae.encode(x.reshape(b * t, d).float())
    rows = torch.arange(b, device=code.indices.device)
    want = maps and t > 1
    img, feat, val, *tokens = per_image_entries(code.indices, code.values, rows, t, sae.d_sae, maps=want)
    return img.cpu(), feat.cpu(), val.cpu(), tokens[0].maps().cpu() if want else None


def quantise(maps: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """``[n, tokens]`` activations and each row's maximum ``[n]`` -> uint8 fractions (255 = the maximum)."""
    frac = maps / activation.clamp_min(torch.finfo(maps.dtype).tiny)[:, None]
    return (frac.clamp(0, 1) * 255).round().to(torch.uint8)


def occlusions(image: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """``[3, H, W]`` model input -> ``[patches, 3, H, W]``: patch ``p`` (row-major) set to 0 in copy ``p``.

    0 in the normalised input is the normalisation's mean colour, so each copy shows the model the
    image with one patch greyed out: the classic occlusion test of where a response comes from.
    """
    ph, pw = patch
    rows, cols = image.shape[1] // ph, image.shape[2] // pw
    out = image.expand(rows * cols, *image.shape).clone()
    for p in range(rows * cols):
        r, c = divmod(p, cols)
        out[p, :, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = 0
    return out
