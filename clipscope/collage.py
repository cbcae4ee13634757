"""A feature's top examples as one image (the study's 4 x 3 collage), rendered on request and cached."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from clipscope.storage import atomic_write_bytes


def render_collage(
    thumbnails: Sequence[Path | Image.Image], activations: Sequence[float], cols: int = 4, rows: int = 3, cell: int = 160, title: str = "",
    veils: Sequence[Image.Image | None] = (),
) -> bytes:
    """PNG bytes: up to ``cols * rows`` thumbnails (files, or images) in rank order, each captioned with its
    activation and covered by its veil when ``veils`` has one (``clipscope.veils.veil_image``)."""
    header = 24 if title else 0
    caption = 18
    canvas = Image.new("RGB", (cols * cell, header + rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 5), title, fill="black")
    for i, (path, act) in enumerate(zip(list(thumbnails)[: cols * rows], activations)):
        x, y = (i % cols) * cell, header + (i // cols) * (cell + caption)
        if isinstance(path, Image.Image):
            tile = path.convert("RGBA").resize((cell, cell))
        else:
            with Image.open(path) as thumb:
                tile = thumb.convert("RGBA").resize((cell, cell))
        veil = veils[i] if i < len(veils) else None
        if veil is not None:
            tile.alpha_composite(veil.resize((cell, cell), Image.Resampling.NEAREST))
        canvas.paste(tile.convert("RGB"), (x, y))
        draw.text((x + 4, y + cell + 2), f"#{i + 1}  {act:.3f}", fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")  # zlib's default level: optimize=True took 3.6x the time for 1.5 % fewer bytes
    return buf.getvalue()


def cached_collage(
    cache_dir: Path, thumbnails: Sequence[Path], activations: Sequence[float], title: str = "", veils: Sequence[Image.Image | None] = ()
) -> Path:
    """The collage file for exactly these examples (and veils); rendered once, then served from ``cache_dir``."""
    veiled = [v.tobytes().hex() if v is not None else None for v in veils]
    key = hashlib.sha256(repr((title, [str(p) for p in thumbnails], [round(a, 6) for a in activations], veiled)).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.png"
    if not path.exists():
        atomic_write_bytes(path, render_collage(thumbnails, activations, title=title, veils=veils))
    return path
