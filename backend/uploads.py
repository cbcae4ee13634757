"""Untrusted image uploads: size, pixel, format and content checks, then a clean RGB image.

Every refusal is a :class:`BadUpload` with an HTTP status and one sentence for the user; nothing an
upload contains can make decoding raise anything else or run unbounded.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF"}
# Signatures of archives, documents and programs; one inside an image file marks a polyglot.
_EMBEDDED = (b"PK\x03\x04", b"%PDF-", b"\x7fELF")
# Markup that a browser could be tricked into running if the file were served back.
_MARKUP = (b"<script", b"<html", b"<?php", b"<svg", b"<!doctype")


class BadUpload(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def sniff(data: bytes) -> str | None:
    """The accepted format the first bytes claim, if any (for telling "corrupt" from "not an image")."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for sig, fmt in _SIGNATURES if data.startswith(sig)), None)


def _gif_end(data: bytes) -> int | None:
    """Offset past a GIF's trailer byte, walking its blocks; None when the structure is broken."""
    try:
        pos = 13
        if data[10] & 0x80:
            pos += 3 * (2 << (data[10] & 0x07))
        while pos < len(data):
            kind = data[pos]
            if kind == 0x3B:
                return pos + 1
            if kind == 0x21:
                pos += 2
            elif kind == 0x2C:
                flags = data[pos + 9]
                pos += 10 + (3 * (2 << (flags & 0x07)) if flags & 0x80 else 0) + 1
            else:
                return None
            while data[pos] != 0:  # data sub-blocks
                pos += data[pos] + 1
            pos += 1
    except IndexError:
        return None
    return None


def _image_end(data: bytes, fmt: str) -> int | None:
    """Offset just past the image's own data for formats with an end marker, else None."""
    if fmt in ("PNG",):
        pos = data.rfind(b"IEND")
        return pos + 8 if pos >= 0 else None  # chunk type + CRC
    if fmt in ("JPEG", "MPO"):
        pos = data.rfind(b"\xff\xd9")
        return pos + 2 if pos >= 0 else None
    if fmt == "GIF":
        return _gif_end(data)
    return None


def check_polyglot(data: bytes, fmt: str) -> None:
    """Refuse files that are an image and something else at once (data after the image, an embedded
    archive or document, or markup)."""
    end = _image_end(data, fmt)
    tail = data[end:] if end is not None else b""
    if len(tail.strip(b"\x00\r\n ")) > 16:
        raise BadUpload(400, f"The {fmt} file carries {len(tail)} bytes of other data after the image (a polyglot file); upload the image alone.")
    if any(sig in data for sig in _EMBEDDED):
        raise BadUpload(400, "The file embeds an archive, document or program next to the image (a polyglot file); upload the image alone.")
    head = data[:65536].lower()
    if any(sig in head for sig in _MARKUP):
        raise BadUpload(400, "The file contains markup or script next to the image data; upload a plain image.")


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> RGB image: EXIF orientation applied; CMYK, 16-bit, palette and alpha converted."""
    if not data:
        raise BadUpload(400, "The upload is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or "unknown"
                if fmt not in ALLOWED_FORMATS:
                    raise BadUpload(415, f"{fmt} images are not accepted; use JPEG, PNG, WebP, GIF, BMP or TIFF.")
                if img.width <= 0 or img.height <= 0:
                    raise BadUpload(400, "The image has no pixels.")
                if img.width * img.height > max_pixels:
                    raise BadUpload(413, f"The image is {img.width} x {img.height} pixels; at most {max_pixels:,} pixels are accepted.")
                check_polyglot(data, fmt)
                img.seek(0)  # the first frame of an animation
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except BadUpload:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadUpload(413, f"The image decompresses to more than {max_pixels:,} pixels.") from None
    except UnidentifiedImageError:
        if claimed := sniff(data):
            raise BadUpload(400, f"The file starts like a {claimed} image but is truncated or corrupt.") from None
        raise BadUpload(415, "The upload is not an image in an accepted format (JPEG, PNG, WebP, GIF, BMP, TIFF).") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError, ZeroDivisionError, MemoryError, struct.error) as exc:
        raise BadUpload(400, f"The image is truncated or corrupt ({type(exc).__name__}).") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited onto white, high bit depths are scaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
