"""Image thumbnails, stored once per distinct image under ``<data_dir>/thumbnails/`` by content hash."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

from PIL import Image

from clipscope.storage import atomic_write_bytes


def content_hash(image: Image.Image) -> str:
    """sha256 of the decoded RGB pixels and the size: equal for equal images, whatever the file format."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def thumbnail_relpath(digest: str) -> str:
    return f"thumbnails/{digest[:2]}/{digest}.webp"


def square_thumbnail(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square and resize: the part of the image CLIP's preprocessing keeps."""
    rgb = image.convert("RGB")
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    return rgb.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def ensure_thumbnail(data_dir: Path, image: Image.Image, size: int) -> tuple[str, str]:
    """(content hash, path relative to the data dir); the WebP file is written only if missing."""
    digest = content_hash(image)
    rel = thumbnail_relpath(digest)
    path = Path(data_dir) / rel
    if not path.exists():
        buf = io.BytesIO()
        square_thumbnail(image, size).save(buf, format="WEBP", quality=85, method=4)
        atomic_write_bytes(path, buf.getvalue())
    return digest, rel


def png_data_uri(image: Image.Image) -> str:
    """A ``data:`` URL of the image, lossless (PNG, fast compression): for a page to show an image that is
    never stored, such as an upload as the model saw it."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
