"""Resumable training checkpoints: ``<run>/checkpoints/step_NNNNNNNN/``.

Each holds the SAE in SAELens layout plus ``trainer_state.pt`` (optimiser, firing tracker, the
open logging window, step). A folder gets its final name only when complete (``atomic_dir``), so
the newest folder present is always a whole checkpoint.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from clipscope.sae.io import load_sae, write_sae_files
from clipscope.sae.model import TopKSAE
from clipscope.storage import atomic_dir

STATE_FILE = "trainer_state.pt"
_PATTERN = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _PATTERN.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, sae: TopKSAE, meta: dict[str, Any], state: dict[str, Any], keep: int) -> Path:
    target = run_dir / "checkpoints" / f"step_{step:08d}"
    with atomic_dir(target) as tmp:
        write_sae_files(sae, tmp, meta)
        torch.save({"step": step, **state}, tmp / STATE_FILE)
    for _, old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_latest(run_dir: Path, device: str) -> tuple[TopKSAE, dict[str, Any]] | None:
    """The newest checkpoint's SAE and trainer state, or None."""
    found = checkpoint_dirs(run_dir)
    if not found:
        return None
    path = found[-1][1]
    sae, _ = load_sae(path, device)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return sae, state
