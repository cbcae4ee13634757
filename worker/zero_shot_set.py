"""A labelled image set ready for zero-shot questions: its classes, their text classifier with the
config's prompts, and its labelled images in batches on the device (evaluation and steering)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from clipscope.clip.classifiers import kept_classifier
from clipscope.clip.loading import LoadedClip
from clipscope.clip.preprocess import ImagePreprocess, preprocess_descriptor
from clipscope.clip.zeroshot import template_set
from clipscope.config import DatasetSpec, RunConfig
from clipscope.errors import ClipScopeError
from worker.batches import image_loader
from worker.context import Context
from clipscope.datasets import build_dataset


@dataclass
class ZeroShotSet:
    spec: DatasetSpec
    classes: list[str]
    templates: str
    """The prompt-template set's name."""
    classifier: torch.Tensor
    """``[embed_dim, classes]`` unit-norm text embeddings."""
    _dataset: object
    _ctx: Context
    _cfg: RunConfig
    _purpose: str

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` on the device, unlabelled images left out, with a progress bar; raises
        ClipScopeError at the end when no image had a label."""
        ctx, cfg = self._ctx, self._cfg
        preprocess = ImagePreprocess(preprocess_descriptor(cfg.model))
        loader = image_loader(self._dataset, preprocess, cfg.evaluate.batch_size, ctx.settings.resolved_num_workers, ctx.device)
        seen = 0
        bar = tqdm(total=len(self._dataset), unit="img", desc=f"{self._purpose} {self.spec.name}/{self.spec.split}",
                   disable=not ctx.settings.progress)
        with bar:
            for images, labels in loader:
                keep = labels >= 0
                if keep.any():
                    seen += int(keep.sum())
                    yield preprocess.to_device(images, ctx.device)[keep.to(ctx.device)], labels[keep].to(ctx.device)
                bar.update(len(keep))
        if seen == 0:
            raise ClipScopeError(f"{self.spec.name}/{self.spec.split} has no labelled images: {self._purpose} needs each image's class.")


def zero_shot_set(ctx: Context, cfg: RunConfig, clip: LoadedClip, spec: DatasetSpec, purpose: str) -> ZeroShotSet:
    """The set named by ``spec`` with its classifier; ``purpose`` names the question in messages and
    the progress bar. Raises ClipScopeError for a set without class names."""
    dataset = build_dataset(spec, ctx.layout.datasets, ctx.settings.allow_downloads)
    if not dataset.classes:
        raise ClipScopeError(f"{spec.name} at {spec.root or 'its default folder'} has no class names: {purpose} needs a labelled set "
                             "(for an image folder, one sub-folder per class).")
    name, templates = template_set(cfg.evaluate.templates)
    classifier = kept_classifier(ctx.layout.models / "classifiers", clip.provenance, lambda: clip.model, cfg.model.name,
                                 dataset.classes, templates, ctx.device)
    return ZeroShotSet(spec, list(dataset.classes), name, classifier, dataset, ctx, cfg, purpose)
