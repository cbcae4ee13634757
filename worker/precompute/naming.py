"""The precompute's naming step: CLIP image embeddings of the precompute set, concept embeddings, and
each feature's best concepts and coherence (the maths: clipscope/naming.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from clipscope.activation_cache import ActivationCache
from clipscope.clip.loading import LoadedClip
from clipscope.clip.preprocess import ImagePreprocess, preprocess_descriptor
from clipscope.clip.zeroshot import build_classifier
from clipscope.config import ModelConfig, NamingConfig
from clipscope.errors import ClipScopeError
from clipscope.naming import FeatureNames, name_features, output_directions, output_names, read_vocabulary, unique_concepts
from worker.batches import autocast, image_loader
from worker.context import Context

log = logging.getLogger(__name__)


@dataclass
class Namer:
    """What naming needs from the run: CLIP, loaded on first use, and the model config the cache was extracted with."""

    clip: Callable[[], LoadedClip]
    model: ModelConfig


def concepts_of(nc: NamingConfig, class_names: list[str]) -> list[str]:
    """The candidate names: the vocabulary, then the dataset's classes when asked for (each once)."""
    return unique_concepts([*read_vocabulary(nc.vocabulary), *(class_names if nc.dataset_classes else [])])


@torch.no_grad()
def image_embeddings(ctx: Context, namer: Namer, cache: ActivationCache, dataset, batch_size: int) -> torch.Tensor:
    """``[n, D]`` unit-norm CLIP image embeddings of the cache's images: kept by the extraction, or computed
    here once (a cache extracted without them) and then kept in the cache."""
    if cache.has_embeddings:
        return torch.from_numpy(np.array(cache.embeddings(), dtype=np.float32))
    if len(dataset) != cache.n_images:
        raise ClipScopeError(f"the precompute dataset has {len(dataset)} images but its activation cache {cache.path} has "
                             f"{cache.n_images}: the images changed after it was extracted; remove that folder to extract them again.")
    clip, device = namer.clip(), ctx.device
    preprocess = ImagePreprocess(preprocess_descriptor(namer.model))
    loader = image_loader(dataset, preprocess, batch_size, ctx.settings.resolved_num_workers, device)
    parts = []
    for images, _ in tqdm(loader, desc="embed images", unit="batch", disable=not ctx.settings.progress):
        with autocast(device, namer.model.precision):
            parts.append(clip.model.encode_image(preprocess.to_device(images, device)).float())
    cache.add_embeddings(torch.nn.functional.normalize(torch.cat(parts), dim=-1).cpu().numpy())
    return torch.from_numpy(np.array(cache.embeddings(), dtype=np.float32))  # as kept (fp16), so a re-run computes the same


@torch.no_grad()
def concept_embeddings(namer: Namer, concepts: list[str], templates: list[str], device: str) -> torch.Tensor:
    """``[D, V]`` unit-norm text embeddings, averaged over the templates (the zero-shot classifier's construction)."""
    return build_classifier(namer.clip().model, namer.model.name, concepts, templates, device).float()


def name_all(ctx: Context, namer: Namer, cache: ActivationCache, dataset, top_rows: torch.Tensor, nc: NamingConfig,
             atoms: torch.Tensor | None = None) -> tuple[FeatureNames, list[str]]:
    """Every feature's best concepts and coherence, and the concepts they index; with the SAE's ``atoms``
    (``W_dec``), also the concepts each writes toward when its tokens include CLS, the one pooled token."""
    concepts = concepts_of(nc, list(dataset.classes))
    if not concepts:
        raise ClipScopeError("precompute.names has no concepts: the vocabulary is empty and the dataset has no classes.")
    started = time.perf_counter()
    images = image_embeddings(ctx, namer, cache, dataset, nc.batch_size).to(ctx.device)
    embedded = time.perf_counter()
    text = concept_embeddings(namer, concepts, nc.templates, ctx.device)
    names = name_features(top_rows, images, text, nc.candidates)
    directions = output_directions(atoms.to(ctx.device), namer.clip().visual) if atoms is not None and namer.model.tokens != "patches" else None
    if directions is not None:
        names.output_concepts, names.output_scores = output_names(directions, text, nc.candidates)
    log.info(
        "named %d features from %d concepts (images embedded in %.1f s, concepts and scores in %.1f s)",
        int((names.scores[:, 0] > 0).sum()), len(concepts), embedded - started, time.perf_counter() - embedded,
    )
    return names, concepts
