"""Stage 1: run CLIP to the hooked block over a dataset and fill an activation cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clipscope.activation_cache import ActivationCache, cache_dir_for
from clipscope.clip.hooks import continue_from, residual_at, token_slice, tokens_per_image
from clipscope.clip.loading import LoadedClip, load_clip, weights_identity
from clipscope.clip.preprocess import ImagePreprocess, preprocess_descriptor
from clipscope.config import DatasetSpec, ExtractConfig, ModelConfig
from worker.batches import autocast, image_loader
from worker.context import Context
from clipscope.datasets import build_dataset

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    cache: ActivationCache
    extracted: int  # images processed by this call (0 when the cache was reused)


def cache_key(model: ModelConfig, dataset_identity: dict, split: str) -> dict:
    return {
        "model": model.name,
        "weights": weights_identity(model),
        "layer": model.layer,
        "tokens": model.tokens,
        "precision": model.precision,
        "preprocess": preprocess_descriptor(model),
        "dataset": dataset_identity,
        "split": split,
    }


def extract(
    ctx: Context,
    model_cfg: ModelConfig,
    spec: DatasetSpec,
    extract_cfg: ExtractConfig,
    clip: LoadedClip | None = None,
    embeddings: bool = False,
) -> ExtractResult:
    """Extract (or resume, or reuse) the activation cache of ``spec`` at ``model_cfg``'s hook site.

    With ``embeddings``, a new cache also keeps each image's CLIP image embedding (for automatic
    names): the rest of the tower runs on the hooked stream, one block of twelve at the default site.
    """
    dataset = build_dataset(spec, ctx.layout.datasets, ctx.settings.allow_downloads)
    descriptor = preprocess_descriptor(model_cfg)
    key = cache_key(model_cfg, dataset.identity(), spec.split)
    width, n_positions = _tower_shape(model_cfg)
    cache = ActivationCache.create_or_open(
        ctx.layout.activations,
        key,
        n_images=len(dataset),
        tokens_per_image=tokens_per_image(model_cfg.tokens, n_positions),
        d=width,
        indices=dataset.indices,
        embed_dim=_embed_dim(model_cfg) if embeddings else None,
    )
    if cache.complete:
        log.info("activation cache %s is complete (%d images): reused", cache.path.name, cache.n_images)
        return ExtractResult(cache, 0)
    start = cache.n_done
    clip = clip or load_clip(model_cfg, ctx.device, cache_dir=ctx.layout.models)
    preprocess = ImagePreprocess(descriptor)
    loader = image_loader(dataset, preprocess, extract_cfg.batch_size, ctx.settings.resolved_num_workers, ctx.device, start)
    writer = cache.writer()
    select = token_slice(model_cfg.tokens)
    since_commit = 0
    bar = tqdm(total=cache.n_images, initial=start, unit="img", desc="extract", disable=not ctx.settings.progress)

    def write(batch: _InFlight) -> None:
        nonlocal since_commit
        acts, embedded = batch.wait()
        writer.write(acts, batch.labels.numpy().astype(np.int64), embedded)
        since_commit += len(batch.labels)
        if since_commit >= extract_cfg.flush_every:
            writer.commit()
            since_commit = 0
        bar.update(len(batch.labels))

    in_flight = None
    with torch.inference_mode(), bar:
        try:
            for images, labels in loader:
                images = preprocess.to_device(images, ctx.device)
                with autocast(ctx.device, model_cfg.precision):
                    stream = residual_at(clip.visual, images, model_cfg.layer)
                    embedded = continue_from(clip.visual, stream, model_cfg.layer).float() if cache.has_embeddings else None
                resid = stream[:, select]
                embedded = torch.nn.functional.normalize(embedded, dim=-1).to(torch.float16) if embedded is not None else None
                queued = _InFlight(resid.to(torch.float16), labels, embedded)
                if in_flight is not None:  # written while the device runs the batch just queued
                    finished, in_flight = in_flight, None  # never written twice, even if writing fails
                    write(finished)
                in_flight = queued
        finally:  # also when stopped: the finished batch is kept, as it was before batches overlapped
            if in_flight is not None:
                write(in_flight)
            writer.commit()
    return ExtractResult(cache, cache.n_images - start)


class _InFlight:
    """A batch's activations on their way to the host. On a GPU the copy is queued behind the forward
    pass and waited for only after the next batch's forward is queued, so the device keeps working
    while the host writes one batch and prepares the next; elsewhere it is the tensor itself."""

    def __init__(self, acts: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor | None = None):
        self.labels = labels
        self.host = acts.to("cpu", non_blocking=True)  # into pinned memory when copied from a GPU
        self.host_embeddings = embeddings.to("cpu", non_blocking=True) if embeddings is not None else None
        self.done = None
        if acts.is_cuda:
            self.done = torch.cuda.Event()
            self.done.record()

    def wait(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The activations and the image embeddings (None when not kept), once on the host."""
        if self.done is not None:
            self.done.synchronize()
        return self.host.numpy(), self.host_embeddings.numpy() if self.host_embeddings is not None else None


def _vision_cfg(model_cfg: ModelConfig) -> dict:
    import open_clip

    return (open_clip.get_model_config(model_cfg.name) or {}).get("vision_cfg", {})


def _tower_shape(model_cfg: ModelConfig) -> tuple[int, int]:
    """(width, token positions) of the vision tower, read from open_clip's model config (no weights)."""
    vision = _vision_cfg(model_cfg)
    grid = vision.get("image_size", 224) // vision.get("patch_size", 32)
    return int(vision.get("width", 768)), grid * grid + 1


def _embed_dim(model_cfg: ModelConfig) -> int:
    import open_clip

    return int((open_clip.get_model_config(model_cfg.name) or {})["embed_dim"])


def cache_path(ctx: Context, model_cfg: ModelConfig, spec: DatasetSpec) -> Path:
    """The folder of ``spec``'s cache at this hook site: two specs that select the same images share it."""
    dataset = build_dataset(spec, ctx.layout.datasets, ctx.settings.allow_downloads)
    return cache_dir_for(ctx.layout.activations, cache_key(model_cfg, dataset.identity(), spec.split))


def is_complete(path: Path) -> bool:
    """Whether the cache at ``path`` (``cache_path``) is complete: then extracting it needs no CLIP."""
    return (path / "metadata.json").is_file() and ActivationCache.open(path).complete
