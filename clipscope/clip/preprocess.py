"""The image preprocessing of a model config, known without loading any weights.

Extraction, evaluation and live analysis all build their transform here, and its descriptor is
hashed into activation-cache names, so "same preprocessing" is checked, not assumed.
"""

from __future__ import annotations

from typing import Any, Callable

from clipscope.config import ModelConfig

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_descriptor(cfg: ModelConfig) -> dict[str, Any]:
    import open_clip

    model_cfg = open_clip.get_model_config(cfg.name) or {}
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    tag_cfg: dict[str, Any] = {}
    if cfg.weights_file is None and not cfg.is_random:
        tag_cfg = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained) or {}
    return {
        "size": [size, size] if isinstance(size, int) else list(size),
        "mean": list(tag_cfg.get("mean") or OPENAI_MEAN),
        "std": list(tag_cfg.get("std") or OPENAI_STD),
        "interpolation": tag_cfg.get("interpolation") or "bicubic",
        "resize_mode": tag_cfg.get("resize_mode") or "shortest",
    }


def build_transform(descriptor: dict[str, Any]) -> Callable:
    """PIL image -> normalised ``[3, H, W]`` tensor, as open_clip evaluates."""
    import open_clip

    return open_clip.image_transform(
        tuple(descriptor["size"]),
        is_train=False,
        mean=tuple(descriptor["mean"]),
        std=tuple(descriptor["std"]),
        resize_mode=descriptor["resize_mode"],
        interpolation=descriptor["interpolation"],
    )
