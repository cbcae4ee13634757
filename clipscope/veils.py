"""Token maps read back and drawn: a stored map's fractions, its patch layout, and the veil a page lays
over the image, clear where the feature fires at the image's maximum, darkest where it does not fire.

Stored maps are written by :func:`clipscope.token_maps.quantise`; this side needs no torch, so the
pages, the feature table and its CSV export load without it.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

VEIL_RGB = (17, 24, 39)
VEIL_ALPHA = 215
"""Opacity (of 255) of the veil over a patch where the feature does not fire; a patch at the image's maximum is clear."""


def fractions(stored: bytes) -> list[float]:
    """A stored token map as fractions of the image's activation."""
    return [b / 255 for b in stored]


@dataclass(frozen=True)
class PatchGrid:
    """How a token map is laid out: ``side`` x ``side`` patches starting at token ``offset``."""

    side: int
    offset: int

    def patches(self, token_map: Sequence[float]) -> list[float]:
        return list(token_map[self.offset : self.offset + self.side * self.side])


def patch_grid(tokens: str, n_tokens: int) -> PatchGrid | None:
    """The patch layout of an SAE's token maps, or None when its tokens have no place (CLS only)."""
    if tokens == "cls":
        return None
    offset = 1 if tokens == "all" else 0
    side = math.isqrt(max(n_tokens - offset, 0))
    if side == 0 or side * side != n_tokens - offset:
        return None
    return PatchGrid(side, offset)


def relative_drops(drops: Sequence[float]) -> list[float]:
    """Occlusion drops scaled so the largest is 1 (rises count as 0): what a veil over them shows."""
    top = max(max(drops, default=0.0), 0.0)
    return [max(d, 0.0) / top if top > 0 else 0.0 for d in drops]


def veil_image(token_map: Sequence[float], tokens: str) -> Image.Image | None:
    """A ``side x side`` RGBA image to lay over the image (scaled without smoothing) from a token map of
    fractions (clamped to 0..1): clear at 1, darkest at 0; None when the SAE's tokens have no place on the image."""
    grid = patch_grid(tokens, len(token_map))
    if grid is None:
        return None
    alpha = bytes(round(VEIL_ALPHA * (1 - min(max(f, 0.0), 1.0))) for f in grid.patches(token_map))
    veil = Image.new("RGBA", (grid.side, grid.side), (*VEIL_RGB, 0))
    veil.putalpha(Image.frombytes("L", (grid.side, grid.side), alpha))
    return veil


def veil_data_uri(token_map: Sequence[float], tokens: str) -> str | None:
    """``veil_image`` as a PNG ``data:`` URL, for a page to lay over a thumbnail."""
    veil = veil_image(token_map, tokens)
    if veil is None:
        return None
    buf = io.BytesIO()
    veil.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def occlusion_veil_data_uri(drops: Sequence[float]) -> str | None:
    """The veil of an occlusion map (one drop per patch, row-major): clear where greying a patch lowers the feature most."""
    return veil_data_uri(relative_drops(drops), "patches")
