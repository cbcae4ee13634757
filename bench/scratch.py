"""A benchmark run's scratch folder, removed when the run ends: each run writes 0.5-1 GB of
generated images, caches and databases, which would otherwise pile up in the temp folder."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
