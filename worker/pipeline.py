"""The stages in order, each idempotent: a finished stage is reused, a partial one resumed."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from clipscope.activation_cache import ActivationCache
from clipscope.clip.classifiers import kept_classifier
from clipscope.clip.loading import LoadedClip, load_clip, provenance
from clipscope.clip.zeroshot import template_set
from clipscope.config import RunConfig
from clipscope.errors import ClipScopeError
from clipscope.sae.io import load_sae
from clipscope.feature_edits import EDIT_SYNTAX, Edit, EditError, parse_edits
from worker.context import Context
from worker.evaluate import EvalResult, evaluate, format_table
from worker.steer import SteerResult, format_steer, steer_dataset
from clipscope.datasets import build_dataset
from worker.extract import cache_path, extract, is_complete
from worker.precompute.naming import Namer
from worker.precompute.overlaps import update_overlaps
from worker.precompute.stage import PrecomputeResult, precompute
from worker.train.imported import import_sae
from worker.train.loop import TrainResult, train

log = logging.getLogger("clipscope")


@contextmanager
def stage(name: str) -> Iterator[dict]:
    """Log the stage's start, then what it reported and how long it took."""
    report: dict = {"did": ""}
    log.info("== %s", name)
    started = time.perf_counter()
    yield report
    log.info("== %s: %s (%.1f s)", name, report["did"], time.perf_counter() - started)


@dataclass
class Caches:
    train: ActivationCache
    eval: ActivationCache | None
    precompute: ActivationCache


class _LazyClip:
    """Loads CLIP on first use, so fully cached runs never touch the weights."""

    def __init__(self, ctx: Context, cfg: RunConfig):
        self.ctx, self.cfg, self.clip = ctx, cfg, None

    def get(self) -> LoadedClip:
        if self.clip is None:
            self.clip = load_clip(self.cfg.model, self.ctx.device, cache_dir=self.ctx.layout.models)
        return self.clip


def run_extract(ctx: Context, cfg: RunConfig, clip: _LazyClip | None = None) -> Caches:
    with stage("extract") as report:
        lazy = clip or _LazyClip(ctx, cfg)
        specs = {"train": cfg.data, "eval": cfg.train.eval_data, "precompute": cfg.precompute_data}
        caches: dict[str, ActivationCache | None] = {}
        parts, done = [], {}
        named_cache = cache_path(ctx, cfg.model, cfg.precompute_data) if cfg.precompute.names.enabled else None
        for role, spec in specs.items():
            if spec is None:
                caches[role] = None
                continue
            if spec in done:  # the same image set serves two roles
                caches[role] = done[spec]
                continue
            path = cache_path(ctx, cfg.model, spec)
            loaded = None if is_complete(path) else lazy.get()
            named = path == named_cache  # its images' embeddings name the features
            result = extract(ctx, cfg.model, spec, cfg.extract, clip=loaded, embeddings=named)
            caches[role] = done[spec] = result.cache
            verb = f"extracted {result.extracted}" if result.extracted else "reused"
            parts.append(f"{role} {spec.name}/{spec.split}: {verb} ({result.cache.n_images} images -> {result.cache.path.name})")
        report["did"] = "; ".join(parts)
    return Caches(caches["train"], caches["eval"], caches["precompute"])


def run_train(ctx: Context, cfg: RunConfig, caches: Caches | None = None) -> TrainResult:
    caches = caches or run_extract(ctx, cfg)
    with stage("train") as report:
        result = (import_sae if cfg.sae.import_from else train)(ctx, cfg, caches.train, caches.eval)
        m = result.metrics
        if result.imported:
            verb = f"imported from {cfg.sae.import_from}"
        else:
            verb = f"trained {result.trained_steps} steps" if result.trained_steps else "reused"
        dead = f", dead {100 * m['dead_fraction']:.2f}%" if "dead_fraction" in m else ""  # an import's training history is not known
        report["did"] = (
            f"{verb}: {result.sae_key}, held-out EVR {m.get('evr', float('nan')):.4f}, L0 {m.get('l0', float('nan')):.1f}{dead} -> {result.sae_dir}"
        )
    return result


def run_evaluate(
    ctx: Context, cfg: RunConfig, caches: Caches | None = None, trained: TrainResult | None = None, clip: _LazyClip | None = None
) -> list[EvalResult]:
    clip = clip or _LazyClip(ctx, cfg)
    caches = caches or run_extract(ctx, cfg, clip)
    trained = trained or run_train(ctx, cfg, caches)
    with stage("evaluate") as report:
        sae, _ = load_sae(trained.sae_dir, ctx.device)
        results = evaluate(ctx, cfg, trained.sae_key, sae, caches.train, clip.get)
        print(format_table(results), flush=True)
        report["did"] = "; ".join(
            f"{r.dataset}/{r.split} {'reused' if r.reused else 'evaluated'} ({r.n} images, splice check {r.max_error_splice_diff:.1e})"
            for r in results
        )
    return results


def run_precompute(
    ctx: Context, cfg: RunConfig, caches: Caches | None = None, trained: TrainResult | None = None, clip: _LazyClip | None = None
) -> PrecomputeResult:
    clip = clip or _LazyClip(ctx, cfg)
    caches = caches or run_extract(ctx, cfg, clip)
    trained = trained or run_train(ctx, cfg, caches)
    with stage("precompute") as report:
        sae, _ = load_sae(trained.sae_dir, ctx.device)
        dataset = build_dataset(cfg.precompute_data, ctx.layout.datasets, ctx.settings.allow_downloads)
        result = precompute(ctx, trained.sae_key, sae, caches.precompute, dataset, cfg.precompute, namer=Namer(clip.get, cfg.model))
        if dataset.classes:
            _keep_classifier(ctx, cfg, clip, list(dataset.classes))
        verb = "reused" if result.reused else "committed"
        measured = update_overlaps(ctx, trained.sae_key) if cfg.precompute.overlaps else None
        report["did"] = (
            f"{verb}: {result.n_features} features over {result.n_images} images, {result.n_examples} examples, "
            f"{result.n_thumbnails} thumbnails; SAE {trained.sae_key} is ready"
            + (f"; features shared with {', '.join(measured)} measured" if measured else "")
            + ("; features shared with other SAEs not measured (precompute.overlaps = false: `clipscope saes overlaps`)"
               if measured is None else "")
        )
    return result


def _keep_classifier(ctx: Context, cfg: RunConfig, clip: _LazyClip, classes: list[str]) -> None:
    """Build and keep, once, the zero-shot classifier of the precompute set's classes with the
    evaluation's templates (``clipscope/clip/classifiers.py``): the explorer explains an upload's
    prediction over those classes, and would otherwise build it on the first request."""
    _, templates = template_set(cfg.evaluate.templates)
    with torch.inference_mode():
        kept_classifier(ctx.layout.models / "classifiers", provenance(cfg.model), lambda: clip.get().model, cfg.model.name,
                        classes, templates, ctx.device)


def run_steer(ctx: Context, cfg: RunConfig, edits: str, datasets: list[str] | None = None) -> list[SteerResult]:
    """Zero-shot accuracy on the config's evaluation sets (or those named in ``datasets``) with
    ``edits`` applied to every image's stream, against clean CLIP; prints the answer. Extracts and
    trains first if needed, like every stage; stores nothing."""
    specs = [s for s in cfg.evaluate.datasets if not datasets or s.name in datasets]
    if not specs:
        known = ", ".join(s.name for s in cfg.evaluate.datasets) or "none"
        raise ClipScopeError(f"No evaluation set of the config is named {', '.join(datasets or [])} (the config's: {known}).")
    # before minutes of extraction or hours of training, not after (an imported SAE's width is known once imported)
    asked = _edits(edits, cfg.sae.d_sae if cfg.sae.import_from is None else 2**62)
    clip = _LazyClip(ctx, cfg)
    caches = run_extract(ctx, cfg, clip)
    trained = run_train(ctx, cfg, caches)
    with stage("steer") as report:
        sae, _ = load_sae(trained.sae_dir, ctx.device)
        _edits(edits, sae.d_sae)  # an imported SAE's own width
        results = [steer_dataset(ctx, cfg, clip.get(), sae, spec, asked) for spec in specs]
        print(format_steer(results), flush=True)
        report["did"] = "; ".join(f"{r.dataset}/{r.split} ({r.n} images)" for r in results) + f", SAE {trained.sae_key}"
    return results


def _edits(text: str, d_sae: int) -> list[Edit]:
    try:
        asked = list(parse_edits(text, d_sae))
    except EditError as exc:
        raise ClipScopeError(str(exc)) from None
    if not asked:
        raise ClipScopeError(f"Name at least one edit: {EDIT_SYNTAX}.")
    return asked


def run_all(ctx: Context, cfg: RunConfig) -> TrainResult:
    clip = _LazyClip(ctx, cfg)  # loaded at most once, by the first stage that needs it
    caches = run_extract(ctx, cfg, clip)
    trained = run_train(ctx, cfg, caches)
    run_evaluate(ctx, cfg, caches, trained, clip)
    run_precompute(ctx, cfg, caches, trained, clip)
    return trained
