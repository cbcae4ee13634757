"""The residual-stream hook site of an open_clip VisionTransformer, without forward hooks.

``residual_at`` runs the tower only up to the hooked block and returns its output (the residual
stream after block ``layer``); ``continue_from`` takes such a (possibly edited) stream and runs
the rest of the tower to the projected image embedding. Together they equal the full forward, to
float rounding on the CPU, where blocks take oneDNN's products (``cpu_blocks``).
"""

from __future__ import annotations

from typing import Literal

import torch

from clipscope.clip import cpu_blocks

TokenMode = Literal["cls", "patches", "all"]


def _blocks(visual: torch.nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    transformer = visual.transformer
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for block in transformer.resblocks[start:stop]:
        x = block(x)
    if not batch_first:
        x = x.transpose(0, 1)
    return x


def check_layer(visual: torch.nn.Module, layer: int) -> None:
    n = len(visual.transformer.resblocks)
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} is outside 0..{n - 1} for this model")


def residual_at(visual: torch.nn.Module, images: torch.Tensor, layer: int) -> torch.Tensor:
    """Residual stream ``[batch, tokens, width]`` after block ``layer`` (0-based); later blocks never run."""
    check_layer(visual, layer)
    return _blocks(visual, visual._embeds(images), 0, layer + 1)


def continue_from(visual: torch.nn.Module, resid: torch.Tensor, layer: int, edited_at: slice | None = None) -> torch.Tensor:
    """Run blocks ``layer + 1 ..`` on a residual stream, then pool and project: the image embedding.

    Where the tower pools the CLS token alone, the last block computes that token's output only on the
    CPU (``cpu_blocks.one_token_applies``): the other tokens' outputs are never read. ``edited_at``: the
    rows of ``resid`` are copies of one stream that differ at these positions alone (an SAE's edits at its
    tokens); when that is the CLS token and the last block follows ``layer`` directly, the other tokens'
    keys and values are computed once for all rows (``cpu_blocks.forward``'s ``shared_rest``)."""
    check_layer(visual, layer)
    blocks = visual.transformer.resblocks
    last = len(blocks) - 1
    if layer < last and _pools_cls(visual) and cpu_blocks.one_token_applies(blocks[last], resid):
        shared = edited_at == token_slice("cls") and layer == last - 1  # an earlier block would carry the edit to every token
        x = cpu_blocks.forward(blocks[last], _blocks(visual, resid, layer + 1, last), token=0, shared_rest=shared)
    else:
        x = _blocks(visual, resid, layer + 1, len(blocks))
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def _pools_cls(visual: torch.nn.Module) -> bool:
    """Whether the tower's embedding reads the last block's output at the CLS token only (open_clip's
    ``pool_type = "tok"`` without attention pooling; ``ln_post`` is per token)."""
    return getattr(visual, "attn_pool", None) is None and getattr(visual, "pool_type", None) == "tok"


def token_slice(tokens: TokenMode) -> slice:
    """Which positions of ``[batch, tokens, width]`` a token mode selects (position 0 is CLS)."""
    return {"cls": slice(0, 1), "patches": slice(1, None), "all": slice(0, None)}[tokens]


def tokens_per_image(tokens: TokenMode, n_positions: int) -> int:
    return len(range(n_positions)[token_slice(tokens)])
