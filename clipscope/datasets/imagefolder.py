"""Any folder tree of images; the class is the first-level folder (images at the top level are unlabelled).

Hidden files and folders (names starting with a dot) are not images of the set: macOS leaves a
``._name.jpg`` resource fork beside every copied ``name.jpg``, and tools keep caches in ``.thumbnails/``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from clipscope.errors import ClipScopeError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def open_rgb(path: Path) -> Image.Image:
    """Open an image file, apply its EXIF orientation and convert to RGB."""
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


class ImageFolder:
    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ClipScopeError(f"Image folder {self.root} does not exist.")
        files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise ClipScopeError(f"Image folder {self.root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        self.files = files
        rel = [f.relative_to(self.root) for f in files]
        self.classes = sorted({r.parts[0] for r in rel if len(r.parts) > 1})
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index[r.parts[0]] if len(r.parts) > 1 else -1 for r in rel]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return open_rgb(self.files[i]), self.labels[i]

    def where(self, i: int) -> str:
        return str(self.files[i])

    def identity(self) -> dict[str, Any]:
        listing = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            listing.update(f"{f.relative_to(self.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"dataset": "imagefolder", "root": str(self.root.resolve()), "listing": listing.hexdigest()[:16]}
