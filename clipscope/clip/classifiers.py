"""Zero-shot classifiers kept on disk, so each is built once.

Building one encodes every class name in every prompt template with CLIP's text tower: Food-101's
101 classes x CLIP's 18 CIFAR templates take ~17 s on 2 CPU cores (well under a second on a GPU).
A classifier depends only on the CLIP weights, the templates and the class names, so it is kept as
``<data_dir>/models/classifiers/<key>.safetensors`` and read back by every later process: the
explorer's explanations and steering, the evaluation, and steering over a set. The precompute
builds the one for its dataset's classes with the evaluation's templates, so the first explanation
of an upload over them does not wait for it. Read back, it equals a fresh build to float rounding
(the device or kernel that built it may differ).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipscope.clip.zeroshot import build_classifier

log = logging.getLogger(__name__)


def classifier_file(folder: Path, weights: dict[str, Any], classes: Sequence[str], templates: Sequence[str]) -> Path:
    """Where the classifier of ``classes`` with ``templates`` by the CLIP of ``weights`` (its
    ``provenance``) is kept. A weights file counts by its hash, not its path."""
    identity = {"weights": {k: v for k, v in weights.items() if k != "weights_file"}, "classes": list(classes), "templates": list(templates)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    return Path(folder) / f"{key}.safetensors"


def stored_classifier(path: Path, build: Callable[[], torch.Tensor], device: str | torch.device) -> torch.Tensor:
    """The classifier kept at ``path``, or ``build()``'s, then kept there; on ``device``. A file that
    cannot be read is built again and replaced."""
    if path.is_file():
        try:
            return load_file(path)["classifier"].to(device)
        except (SafetensorError, KeyError, OSError) as exc:
            log.warning("rebuilding the zero-shot classifier %s: %s", path.name, exc)
    classifier = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"classifier": classifier.detach().float().cpu().contiguous()}, partial)
    os.replace(partial, path)  # readers see the whole file or none
    return classifier


def kept_classifier(folder: Path, weights: dict[str, Any], model: Callable[[], torch.nn.Module], model_name: str,
                    classes: Sequence[str], templates: Sequence[str], device: str | torch.device) -> torch.Tensor:
    """``[embed_dim, classes]``: the kept classifier of ``classes`` with ``templates`` by the CLIP of
    ``weights``, or one built with ``model()`` (called only then, so CLIP loads only when needed) and kept."""
    build = lambda: build_classifier(model(), model_name, list(classes), list(templates), device)  # noqa: E731
    return stored_classifier(classifier_file(folder, weights, classes, templates), build, device)
