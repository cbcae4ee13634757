"""Process-wide settings, read once from ``CLIPSCOPE_*`` environment variables (or a ``.env`` file).

Run parameters (model, dataset, SAE size, recipe) live in the TOML run config instead
(:mod:`clipscope.config`); settings are about *where* things live and *what machine* runs them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from clipscope.errors import ClipScopeError, validation_reason


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity; all of them on macOS, which has none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Settings(BaseSettings):
    """Environment-level settings. Every field maps to ``CLIPSCOPE_<FIELD NAME>``."""

    model_config = SettingsConfigDict(env_prefix="CLIPSCOPE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        default=Path("data"),
        description="Root of everything ClipScope writes: datasets, model weights, activation "
        "caches, SAE runs and (by default) the SQLite database.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the database; default sqlite:///<data_dir>/clipscope.db. "
        "Use postgresql+psycopg://user:pass@host/db for PostgreSQL.",
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="Torch device for CLIP and the SAE: 'auto' (cuda when available, else cpu), "
        "'cpu', 'cuda' or 'cuda:N'.",
    )
    allow_downloads: bool = Field(
        default=True,
        description="Whether torchvision datasets may be downloaded when missing. "
        "When false, a missing file fails at once with the path to put it at.",
    )
    num_workers: NonNegativeInt | Literal["auto"] = Field(
        default="auto",
        description="Image-decoding worker processes for extraction and evaluation (0 decodes in the main process). "
        "'auto': one per CPU core this process may use, less one for the main process, at most 16 (on a GPU "
        "machine decoding is what keeps the GPU fed).",
    )
    cuda_graphs: Literal["no", "yes"] = Field(
        default="no",
        description="Train on a GPU with the step captured once as a CUDA graph and replayed (worker/train/graphed.py): "
        "one launch per step instead of ~70, for small batches where launching is slower than the GPU's work. "
        "Same arithmetic as the eager step; off until measured on a GPU (scripts/gpu-check.sh compares both).",
    )
    cpu_gemm: Literal["onednn", "mkl"] = Field(
        default="onednn",
        description="Kernel of the dense fp32 products on the CPU (the SAE encoder, the neighbour search, CLIP's blocks "
        "and patch embedding): 'onednn' (torch's oneDNN matmul, 1.1-1.8x faster than MKL on AMD CPUs; CLIP's blocks "
        "and patch embedding then run as clipscope/clip/cpu_blocks.py) or 'mkl' (plain F.linear, CLIP's modules as open_clip's). "
        "Fixed per process, never chosen by timing.",
    )
    reads_in_event_loop: Literal["auto", "yes", "no"] = Field(
        default="auto",
        description="Where the web server runs the queries of its most-read pages (feature page, feature list and "
        "their /api twins): 'yes' on the event loop, 'no' in a worker thread, 'auto' on the event loop for SQLite "
        "(local reads through mmap, ~1 ms) and in a thread for PostgreSQL (network round trips). A thread hop costs "
        "more server CPU than a feature page's queries; writes always run in threads.",
    )
    progress: bool = Field(default=True, description="Show progress bars on the console.")
    max_upload_bytes: int = Field(
        default=20 * 1024 * 1024,
        description="Largest accepted request body for uploads (bytes); larger ones get 413 before they are read.",
    )
    max_image_pixels: int = Field(
        default=40_000_000, description="Largest accepted image (width x height); larger ones get 413 before decoding."
    )
    analyze_queue: int = Field(
        default=16, description="Uploads waiting for analysis at most; when full the server answers 503 with Retry-After."
    )
    analyze_batch: int = Field(default=8, description="Queued uploads analysed together in one forward pass.")
    analyze_set_max: int = Field(
        default=16, ge=2,
        description="Most images one \"which features do these images share\" request may send, counter-examples included (all of them together "
        "within max_upload_bytes); they are analysed analyze_batch at a time.",
    )
    analyze_kept: int = Field(
        default=64,
        description="Analysed images the analyze page keeps in memory, as CLIP saw them (224 x 224, ~150 KB each), so "
        "the same image can be asked about again (other edits, an explanation) without uploading it again; the "
        "least recently used goes first.",
        ge=0,
    )
    auth: Literal["none", "password"] = Field(
        default="none",
        description="'none': anyone may browse and label (authors type their name); 'password': labelling "
        "requires logging in (users are added with `clipscope users add`), and the author is the user.",
    )
    browse: Literal["open", "closed"] = Field(
        default="open", description="With auth = password: 'open' lets anyone browse, 'closed' requires logging in for every page."
    )
    secret_key: str | None = Field(
        default=None,
        description="Key that signs session cookies; default: a random key kept in <data_dir>/secret_key (created on first use).",
    )

    def resolved_secret_key(self) -> str:
        """The configured key, or the one kept in the data dir (created with mode 0600 on first use)."""
        if self.secret_key:
            return self.secret_key
        import os
        import secrets

        path = Path(self.data_dir) / "secret_key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48))
        return path.read_text().strip()

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file under ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'clipscope.db').resolve()}"

    @property
    def resolved_reads_in_event_loop(self) -> bool:
        """``reads_in_event_loop`` with 'auto' decided by the database: SQLite yes, others no."""
        if self.reads_in_event_loop == "auto":
            return self.resolved_database_url.startswith("sqlite")
        return self.reads_in_event_loop == "yes"

    @property
    def resolved_num_workers(self) -> int:
        """``num_workers`` with 'auto' decided by the cores this process may run on."""
        if self.num_workers != "auto":
            return self.num_workers
        return max(1, min(16, usable_cores() - 1))

    def resolved_device(self) -> str:
        """The concrete torch device string for ``device='auto'``; a GPU asked for must be there."""
        if self.device == "cpu":
            return self.device
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if not torch.cuda.is_available():
            raise ClipScopeError(f"CLIPSCOPE_DEVICE={self.device}, but PyTorch sees no CUDA GPU on this machine; set it to cpu or auto.")
        index, count = int(self.device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise ClipScopeError(f"CLIPSCOPE_DEVICE={self.device}, but this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}.")
        return self.device


@lru_cache
def get_settings() -> Settings:
    """The settings of this process (cached; tests call ``get_settings.cache_clear()``); a value that is
    not valid is a ``ClipScopeError`` naming its variable."""
    try:
        return Settings()
    except ValidationError as exc:
        reasons: dict[str, tuple[object, list[str]]] = {}
        for error in exc.errors():  # a union (num_workers) reports each alternative: "... or ..."
            reasons.setdefault(str(error["loc"][0]), (error.get("input"), []))[1].append(validation_reason(error))
        raise ClipScopeError("; ".join(
            f"CLIPSCOPE_{name.upper()}={value!r} is not valid: {' or '.join(why)}" for name, (value, why) in reasons.items()
        ) + ".") from None
