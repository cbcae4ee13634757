"""Load open_clip CLIP from a pretrained tag, a local weights file, or (only when asked) random init."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from clipscope.clip import cpu_blocks
from clipscope.config import ModelConfig
from clipscope.errors import ClipScopeError


@dataclass
class LoadedClip:
    """A CLIP model ready for inference, its image preprocessing, and where its weights came from."""

    model: torch.nn.Module
    preprocess: Callable
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    @property
    def n_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return self.model.visual.transformer.width


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(cfg: ModelConfig) -> dict[str, Any]:
    """What determines the weights: recorded with every artifact and hashed into cache names."""
    if cfg.weights_file is not None:
        path = Path(cfg.weights_file).expanduser()
        if not path.is_file():
            raise ClipScopeError(f"model.weights_file {path} does not exist.")
        return {"source": "file", "weights_file": str(path.resolve()), "sha256": file_sha256(path)}
    if cfg.is_random:
        return {"source": "random", "init_seed": cfg.init_seed}
    return {"source": "pretrained", "pretrained": cfg.pretrained}


def provenance(cfg: ModelConfig) -> dict[str, Any]:
    return {"model": cfg.name, "random_init": cfg.is_random, **weights_identity(cfg)}


def load_clip(
    cfg: ModelConfig, device: str | torch.device = "cpu", cache_dir: Path | None = None
) -> LoadedClip:
    """Build the model in eval mode on ``device``, its blocks taking oneDNN's products on the CPU
    (``cpu_blocks``); fail with one actionable sentence when weights are missing."""
    import open_clip

    if cfg.name not in open_clip.list_models():
        raise ClipScopeError(f"Unknown open_clip model {cfg.name!r}; ClipScope is built for 'ViT-B-32'.")
    prov = provenance(cfg)
    if prov["source"] == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model, _, preprocess = open_clip.create_model_and_transforms(cfg.name, pretrained=None)
    elif prov["source"] == "file":
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(cfg.name, pretrained=prov["weights_file"])
        except Exception as exc:  # open_clip raises several types for an unreadable checkpoint
            raise ClipScopeError(
                f"Could not load CLIP weights from {prov['weights_file']}: {exc}. "
                "It must be an open_clip checkpoint for this architecture."
            ) from exc
    else:
        tags = open_clip.list_pretrained_tags_by_model(cfg.name)
        if cfg.pretrained not in tags:
            raise ClipScopeError(
                f"Unknown pretrained tag {cfg.pretrained!r} for {cfg.name}; known tags: {', '.join(tags)} "
                "(or pretrained = 'none' for random weights)."
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                cfg.name, pretrained=cfg.pretrained, cache_dir=str(cache_dir) if cache_dir else None
            )
        except Exception as exc:  # hub errors, OSError, RuntimeError: all mean "weights unavailable"
            raise ClipScopeError(
                f"Could not download the open_clip weights {cfg.name}/{cfg.pretrained} ({type(exc).__name__}); "
                "download open_clip_pytorch_model.bin on a machine with internet and set "
                "model.weights_file = '/path/to/open_clip_pytorch_model.bin' in the config."
            ) from exc
    model.eval().requires_grad_(False).to(device)
    cpu_blocks.install(model)
    return LoadedClip(model=model, preprocess=preprocess, provenance=prov)

