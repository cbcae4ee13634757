"""A generated corpus of hostile and awkward uploads: (name, bytes, expected status class)."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image


def _img(mode="RGB", size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("RGB", "RGBA", "CMYK"):
        arr = rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
        return Image.fromarray(arr, mode=mode)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8), mode="L").convert(mode)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width=100_000, height=100_000) -> bytes:
    """A PNG whose header declares 10^10 pixels over a tiny compressed body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.txt", "hello " * 50)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A 40 x 20 JPEG whose EXIF orientation (6) says: rotate 90 degrees clockwise to view."""
    img = _img(size=(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", exif=exif.tobytes())


def corpus() -> list[tuple[str, bytes, int]]:
    """Expected: 200 (accepted), or the 4xx class (400, 413, 415, 400) the upload must get."""
    jpeg, png, gif = _save(_img(), "JPEG"), _save(_img(), "PNG"), _save(_img("P"), "GIF")
    webp, bmp, tiff = _save(_img(), "WEBP"), _save(_img(), "BMP"), _save(_img(), "TIFF")
    frames = [_img("P", seed=i) for i in range(3)]
    anim = io.BytesIO()
    frames[0].save(anim, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    palette_alpha = _img("P")
    palette_alpha.info["transparency"] = 0
    sixteen = Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)  # mode I;16
    files = [
        # accepted, converted as needed
        ("ok.jpg", jpeg, 200), ("ok.png", png, 200), ("ok.gif", gif, 200), ("ok.webp", webp, 200), ("ok.bmp", bmp, 200),
        ("ok.tiff", tiff, 200), ("animated.gif", anim.getvalue(), 200), ("cmyk.jpg", _save(_img("CMYK"), "JPEG"), 200),
        ("rgba.png", _save(_img("RGBA"), "PNG"), 200), ("palette-alpha.png", _save(palette_alpha, "PNG"), 200),
        ("sixteen-bit.png", _save(sixteen, "PNG"), 200), ("grey.jpg", _save(_img("L"), "JPEG"), 200),
        ("exif-rotated.jpg", exif_rotated_jpeg(), 200), ("png-named.jpg", png, 200),
        # empty and garbage
        ("empty.jpg", b"", 400), ("one-byte.png", b"\x89", 415), ("random.bin", np.random.default_rng(0).bytes(4096), 415),
        ("text.jpg", b"this is not an image\n" * 20, 415), ("html.png", b"<!doctype html><script>alert(1)</script>", 415),
        ("svg.png", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', 415),
        ("pdf.jpg", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415), ("zip.png", _zip(), 415),
        ("gzip.jpg", gzip.compress(png), 415), ("ico.ico", _save(_img(size=(32, 32)), "ICO"), 415),
        ("tga.tga", _save(_img(), "TGA"), 415),
        # truncated and corrupt
        ("truncated.jpg", jpeg[: len(jpeg) // 2], 400), ("truncated.png", png[: len(png) // 2], 400),
        ("header-only.png", png[:40], 400), ("truncated.gif", gif[:30], 400), ("truncated.webp", webp[:40], 400),
        ("truncated.tiff", tiff[:100], 400), ("truncated.bmp", bmp[:60], 400),
        ("bad-crc.png", png[:29] + bytes([png[29] ^ 0xFF]) + png[30:], 400),
        ("zero-size.png", b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)) + _png_chunk(b"IEND", b""), 400),
        # too big
        ("bomb.png", png_bomb(), 413), ("wide-bomb.png", png_bomb(1_000_000, 100), 413),
        # polyglots
        ("png+zip.png", png + _zip(), 400), ("jpeg+html.jpg", jpeg + b"<html><script>alert(1)</script></html>" * 4, 400),
        ("gif+js.gif", gif + b"alert(document.cookie);//" * 8, 400), ("jpeg+pdf.jpg", jpeg + b"%PDF-1.4 trailing document " * 4, 400),
        ("html-in-png-text.png", _save(_img(), "PNG", pnginfo=_pnginfo("<script>alert(1)</script>")), 400),
        ("zip-in-png-text.png", _save(_img(), "PNG", pnginfo=_pnginfo(_zip().decode("latin-1"))), 400),
        ("soi-only.jpg", b"\xff\xd8\xff", 400), ("riff-not-webp.webp", b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\x00" * 16, 415),
        ("bmp-garbage.bmp", b"BM" + np.random.default_rng(1).bytes(200), 400),
        ("gif-bomb.gif", b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00" + b"\x2c" + struct.pack("<HHHH", 0, 0, 65535, 65535) + b"\x00\x02\x02\x44\x01\x00\x3b", 413),
        ("tiff-bomb.tiff", _tiff_header(200_000, 200_000), 413),
    ]
    return files


def _tiff_header(width: int, height: int) -> bytes:
    """A little-endian TIFF whose only IFD declares a huge 8-bit greyscale image with no data."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8), (279, 4, 1, 0)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def _pnginfo(text: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", text)
    return info
