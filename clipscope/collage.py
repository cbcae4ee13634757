"""A feature's top examples as one image (the study's 4 x 3 collage), rendered on request and cached."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from clipscope.storage import atomic_write_bytes


def render_collage(
    thumbnails: Sequence[Path], activations: Sequence[float], cols: int = 4, rows: int = 3, cell: int = 160, title: str = ""
) -> bytes:
    """PNG bytes: up to ``cols * rows`` thumbnails in rank order, each captioned with its activation."""
    header = 24 if title else 0
    caption = 18
    canvas = Image.new("RGB", (cols * cell, header + rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 5), title, fill="black")
    for i, (path, act) in enumerate(zip(list(thumbnails)[: cols * rows], activations)):
        x, y = (i % cols) * cell, header + (i // cols) * (cell + caption)
        with Image.open(path) as thumb:
            canvas.paste(thumb.convert("RGB").resize((cell, cell)), (x, y))
        draw.text((x + 4, y + cell + 2), f"#{i + 1}  {act:.3f}", fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def cached_collage(cache_dir: Path, thumbnails: Sequence[Path], activations: Sequence[float], title: str = "") -> Path:
    """The collage file for exactly these examples; rendered once, then served from ``cache_dir``."""
    key = hashlib.sha256(repr((title, [str(p) for p in thumbnails], [round(a, 6) for a in activations])).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.png"
    if not path.exists():
        atomic_write_bytes(path, render_collage(thumbnails, activations, title=title))
    return path
