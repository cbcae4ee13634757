"""The image preprocessing of a model config, known without loading any weights.

Extraction, evaluation and live analysis all build their preprocessing here, and its descriptor is
hashed into activation-cache names, so "same preprocessing" is checked, not assumed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.data import default_collate

from clipscope.config import ModelConfig
from clipscope.errors import ClipScopeError

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
        **({"resize": "torch"} if cfg.resize == "torch" else {}),  # absent for PIL: older caches keep their names
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


class ImagePreprocess:
    """A descriptor's preprocessing, split where the work runs: ``host`` in the image-decoding
    workers, ``collate`` when they batch, ``to_device`` in the stage that runs CLIP.

    With PIL (the default) the workers do everything and ``to_device`` moves the batch. With
    ``"resize": "torch"`` the workers only hand over the decoded pixels (uint8, any size) and the
    device resizes, crops and normalises them with torchvision, the same antialiased filter as PIL
    on the same uint8 grid; images of equal size are resized together.
    """

    def __init__(self, descriptor: dict[str, Any]):
        self.descriptor = descriptor
        self.on_device = descriptor.get("resize") == "torch"
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if not self.on_device:
            self._pil = build_transform(descriptor)
            return
        size, mode = list(descriptor["size"]), descriptor["resize_mode"]
        if mode == "shortest" and size[0] == size[1]:
            self._resize_to: list[int] = size[:1]  # the shorter side, as torchvision's Resize(int)
        elif mode == "squash":
            self._resize_to = size
        else:
            raise ClipScopeError(f"resize = 'torch' supports the 'shortest' (square) and 'squash' resize modes, not {mode!r}; use resize = 'pil'.")
        from torchvision.transforms import InterpolationMode

        self._size = size
        self._interpolation = InterpolationMode(descriptor["interpolation"])

    def host(self, image: Image.Image) -> torch.Tensor:
        """In a worker: the model input (PIL) or the decoded ``[3, H, W]`` uint8 pixels (torch)."""
        if not self.on_device:
            return self._pil(image)
        from torchvision.transforms.v2 import functional as TF

        return TF.pil_to_tensor(image.convert("RGB"))

    def collate(self, items: list[tuple[torch.Tensor, int]]):
        """``(images, labels)``: images stacked (PIL; in a worker straight into shared memory), or kept as a
        list of differently sized pixels (torch)."""
        if not self.on_device:
            return default_collate(items)
        return [image for image, _ in items], torch.tensor([label for _, label in items], dtype=torch.long)

    def to_device(self, images, device: str | torch.device) -> torch.Tensor:
        """The ``[B, 3, H, W]`` float model input on ``device``, in the order given."""
        if not self.on_device:
            return images.to(device, non_blocking=True)
        from torchvision.transforms.v2 import functional as TF

        device = torch.device(device)
        mean, std = self._normalisation(device)
        pixels = [image.to(device, non_blocking=True) for image in images]
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(pixels):
            by_size[tuple(image.shape)].append(i)
        out = torch.empty(len(pixels), 3, *self._size, device=device)
        for rows in by_size.values():
            batch = TF.resize(torch.stack([pixels[i] for i in rows]), self._resize_to, self._interpolation, antialias=True)
            batch = TF.to_dtype(TF.center_crop(batch, self._size), torch.float32, scale=True)
            out.index_copy_(0, _on(device, rows), batch.sub_(mean).div_(std))
        return out

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` as ``[3, 1, 1]`` tensors on ``device``, copied there once: a copy from
        ordinary host memory to a GPU waits for the device (torchvision's ``normalize`` makes one per call)."""
        if device not in self._stats:
            self._stats[device] = tuple(torch.tensor(self.descriptor[k]).view(3, 1, 1).to(device) for k in ("mean", "std"))
        return self._stats[device]

    def __call__(self, images: list[Image.Image], device: str | torch.device = "cpu") -> torch.Tensor:
        """Everything at once, in one process (live analysis)."""
        return self.to_device(self.collate([(self.host(image), -1) for image in images])[0], device)

    def pixels(self, batch: torch.Tensor) -> list[Image.Image]:
        """What the model saw: each ``[3, H, W]`` model input of ``batch`` as an RGB image (normalisation undone)."""
        mean, std = self._normalisation(batch.device)
        rgb = (batch * std + mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
        return [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in rgb]


def _on(device: torch.device, rows: list[int]) -> torch.Tensor:
    """``rows`` as an index tensor on ``device``; to a GPU through pinned memory, so the copy does not wait for it."""
    index = torch.tensor(rows)
    return index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index.to(device)
