"""Where artifacts live under the data dir, and how they are written so a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from clipscope.errors import ClipScopeError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling and ``os.replace``: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    """A JSON file ClipScope wrote (cache metadata, an SAE's cfg.json); one that is not JSON is named, with the way out."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ClipScopeError(
            f"{path} is not valid JSON ({exc}): ClipScope writes it whole, so something else damaged it. Restore it, "
            f"or remove {path.parent} and run the stage that makes it again."
        ) from None


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``target`` as a whole.

    The swap is two renames (old out of the way, new in), so at any instant ``target`` is either
    the complete old folder, absent, or the complete new one; never a mixture.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class DataLayout:
    """Paths under the data dir (one place, so every stage and the docs agree)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def activations(self) -> Path:
        return self.root / "activations"

    @property
    def saes(self) -> Path:
        return self.root / "saes"

    @property
    def collages(self) -> Path:
        return self.root / "collages"

    @property
    def thumbnails(self) -> Path:
        return self.root / "thumbnails"

    def dataset_root(self, name: str) -> Path:
        return self.datasets / name
