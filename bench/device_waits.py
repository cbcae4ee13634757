"""Where code waits for a GPU: CUDA's sync debug mode, its warnings recorded by source line."""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def host_waits() -> Iterator[Counter]:
    """Counts, by ``file:line``, every operation inside the block that made the host wait for the GPU."""
    where: Counter = Counter()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield where
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    where.update(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower())
