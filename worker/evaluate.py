"""Stage 3: zero-shot accuracy of CLIP, clean and with the SAE spliced in, into the database."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sqlalchemy import delete, select

from clipscope.activation_cache import ActivationCache
from clipscope.attribution import ClassSupport
from clipscope.clip.hooks import residual_at
from clipscope.clip.loading import LoadedClip
from clipscope.clip.zeroshot import correct_at_k, loss_sums, template_set, zero_shot_logits
from clipscope.config import DatasetSpec, RunConfig, stable_hash
from clipscope.datasets import build_dataset
from clipscope.db.models import Evaluation, Sae, utcnow
from clipscope.db.session import session_scope
from clipscope.evaluation_summary import class_drops, loss_recovered
from clipscope.sae.model import TopKSAE
from clipscope.splice import CONDITIONS, check_error_splice, spliced_features
from worker.batches import autocast
from worker.context import Context
from worker.zero_shot_set import zero_shot_set

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    dataset: str
    split: str
    n: int
    templates: str
    accuracy: dict[str, tuple[float, float]]  # condition -> (top1, top5), fractions
    max_error_splice_diff: float
    reused: bool = False
    by_class: dict[str, dict[str, Any]] | None = None
    """Per condition, per class: ``classes``, ``n`` (images), ``hits`` (top-1 correct) and ``mistaken_for``
    (the wrong class predicted most often and how often; [-1, 0] with no mistake); the clean condition's
    also ``features``: per class the 10 features of most first-order support for its centred logit on its
    images, ``[feature, mean support]`` (``clipscope.attribution.ClassSupport``)."""
    loss: dict[str, tuple[float, float]] | None = None
    """Per condition, the mean zero-shot cross-entropy and the mean KL divergence from clean's class
    distribution, in nats (``clipscope.clip.zeroshot.loss_sums``)."""


def training_mean(cache: ActivationCache, chunk: int = 4096) -> torch.Tensor:
    """Per-position mean ``[tokens_per_image, d]`` of the SAE's training activations (float64 sums)."""
    acts = cache.activations()
    total = np.zeros((cache.tokens_per_image, cache.d), dtype=np.float64)
    for start in range(0, cache.n_images, chunk):
        total += acts[start : start + chunk].astype(np.float64).sum(axis=0)
    return torch.from_numpy(total / cache.n_images).float()


def evaluate_dataset(
    ctx: Context, cfg: RunConfig, clip: LoadedClip, sae: TopKSAE, mean: torch.Tensor, spec: DatasetSpec, class_support: bool = True,
) -> EvalResult:
    """Accuracy under every condition on one labelled set, with the spliced+error check on every batch;
    with ``class_support``, also the features each class rests on (``bench/evaluate.py`` times it off)."""
    labelled = zero_shot_set(ctx, cfg, clip, spec, "zero-shot evaluation")
    classifier = labelled.classifier
    correct = {c: {1: 0, 5: 0} for c in CONDITIONS}
    n_classes = len(labelled.classes)
    confusion = {c: torch.zeros(n_classes * n_classes, dtype=torch.long, device=ctx.device) for c in CONDITIONS}  # [true, predicted]
    support = ClassSupport.for_classes(n_classes, sae.d_sae, ctx.device) if class_support else None
    losses = {c: torch.zeros(2, dtype=torch.float64, device=ctx.device) for c in CONDITIONS}  # summed cross-entropy, KL
    n, worst = 0, 0.0
    with torch.inference_mode():
        for images, labels in labelled.batches():
            with autocast(ctx.device, cfg.evaluate.precision):
                resid = residual_at(clip.visual, images, cfg.model.layer)
                feats = spliced_features(clip.visual, sae, images, cfg.model.layer, cfg.model.tokens, CONDITIONS, mean, resid=resid)
            if support is not None:
                with torch.inference_mode(False):  # one backward pass through the blocks after the hook site, in fp32
                    support.add(clip.model, sae, resid.float().clone(), cfg.model.layer, cfg.model.tokens, classifier, labels.clone())
            logits = {c: zero_shot_logits(clip.model, f.float(), classifier) for c, f in feats.items()}
            worst = max(worst, check_error_splice(logits["clean"], logits["spliced_error"]))
            for c, lg in logits.items():
                for k, hits in correct_at_k(lg, labels).items():
                    correct[c][k] += hits
                confusion[c] += torch.bincount(labels * n_classes + lg.argmax(dim=1), minlength=n_classes * n_classes)
                losses[c] += torch.stack(loss_sums(lg, logits["clean"], labels))
            n += len(labels)
    accuracy = {c: (correct[c][1] / n, correct[c][5] / n) for c in CONDITIONS}
    by_class = per_class(labelled.classes, confusion)
    by_class["clean"]["features"] = support.top(10) if support is not None else None  # None: too many classes x features to tally
    loss = {c: (float(v[0]) / n, float(v[1]) / n) for c, v in losses.items()}
    return EvalResult(spec.name, spec.split, n, labelled.templates, accuracy, worst, by_class=by_class, loss=loss)


def per_class(classes: list[str], confusion: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per condition, each class's image count, top-1 hits and the class it is most often mistaken for."""
    k = len(classes)
    out = {}
    for c, flat in confusion.items():
        m = flat.view(k, k).cpu()
        wrong = m - torch.diag(m.diagonal())
        count, other = wrong.max(dim=1)
        out[c] = {"classes": list(classes), "n": m.sum(dim=1).tolist(), "hits": m.diagonal().tolist(),
                  "mistaken_for": [[int(o) if n else -1, int(n)] for o, n in zip(other.tolist(), count.tolist())]}
    return out


def evaluate(ctx: Context, cfg: RunConfig, sae_key: str, sae: TopKSAE, train_cache: ActivationCache, clip_getter) -> list[EvalResult]:
    """Evaluate every configured set not yet evaluated for this SAE; rows replace older ones of the same key."""
    url = ctx.database_url
    results: list[EvalResult] = []
    mean = None
    template_name, templates = template_set(cfg.evaluate.templates)
    with session_scope(url) as s:
        sae_id = s.scalar(select(Sae.id).where(Sae.key == sae_key))
    for spec in cfg.evaluate.datasets:
        dataset = build_dataset(spec, ctx.layout.datasets, ctx.settings.allow_downloads)
        dataset_key = stable_hash(dataset.identity())
        with session_scope(url) as s:
            rows = s.scalars(
                select(Evaluation).where(
                    Evaluation.sae_id == sae_id, Evaluation.dataset_key == dataset_key, Evaluation.templates == template_name
                )
            ).all()
            # complete: every condition, each with its per-class tallies and losses, the clean one with its features (older rows are redone)
            complete = {r.condition: (r.details or {}).get("by_class") for r in rows}
            loss = {r.condition: (r.details["ce"], r.details["kl"]) for r in rows if "ce" in (r.details or {})}
            if set(complete) == set(CONDITIONS) == set(loss) and all(complete.values()) and "features" in complete["clean"]:
                acc = {r.condition: (r.top1, r.top5) for r in rows}
                results.append(EvalResult(spec.name, spec.split, rows[0].n, template_name, acc, rows[0].details["splice_check"], reused=True,
                                          by_class=complete, loss=loss))
                continue
        if mean is None:
            mean = training_mean(train_cache).to(ctx.device)
        started = time.perf_counter()
        result = evaluate_dataset(ctx, cfg, clip_getter(), sae.to(ctx.device), mean, spec)
        seconds = time.perf_counter() - started
        with session_scope(url) as s:
            s.get(Sae, sae_id).updated_at = utcnow()  # the explorer's per-SAE copies of evaluation results follow this
            s.execute(
                delete(Evaluation).where(
                    Evaluation.sae_id == sae_id, Evaluation.dataset_key == dataset_key, Evaluation.templates == template_name
                )
            )
            for condition, (top1, top5) in result.accuracy.items():
                s.add(
                    Evaluation(
                        sae_id=sae_id, dataset=spec.name, split=spec.split, dataset_key=dataset_key, n=result.n,
                        templates=template_name, n_templates=len(templates), condition=condition, top1=top1, top5=top5,
                        details={"splice_check": result.max_error_splice_diff, "precision": cfg.evaluate.precision, "seconds": seconds,
                                 "ce": result.loss[condition][0], "kl": result.loss[condition][1],
                                 **({"by_class": result.by_class[condition]} if result.by_class else {})},
                    )
                )
        results.append(result)
    return results


def _loss_columns(r: EvalResult) -> str:
    """The table's loss recovered and spliced KL, or dashes for an evaluation without losses."""
    if r.loss is None:
        return f"{'–':>9} {'–':>7}"
    recovered = loss_recovered(*(r.loss[c][0] for c in ("clean", "spliced", "mean_ablation")))
    return f"{f'{100 * recovered:.1f}%' if recovered is not None else '–':>9} {r.loss['spliced'][1]:>7.4f}"


def format_table(results: list[EvalResult], hurt_most: int = 3) -> str:
    """The study's table: clean vs spliced top-1, the drop in pp and relative %, plus the other conditions,
    the share of the cross-entropy that mean-ablation adds which the splice recovers, and the spliced KL from
    clean; then, per set, the ``hurt_most`` classes whose accuracy the splice lowers most."""
    head = (f"{'dataset':<18} {'n':>6} {'clean':>7} {'spliced':>8} {'drop pp':>8} {'drop %':>7} {'+error':>7} {'mean-abl':>8} "
            f"{'top-5 clean/spliced':>20} {'loss rec.':>9} {'KL':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        clean, spliced = r.accuracy["clean"][0], r.accuracy["spliced"][0]
        drop = 100 * (clean - spliced)
        rel = f"{100 * (clean - spliced) / clean:>6.1f}%" if clean else f"{'–':>7}"  # undefined without a clean hit, as on the overview
        lines.append(
            f"{r.dataset + '/' + r.split:<18} {r.n:>6} {100 * clean:>6.2f}% {100 * spliced:>7.2f}% {drop:>8.2f} {rel} "
            f"{100 * r.accuracy['spliced_error'][0]:>6.2f}% {100 * r.accuracy['mean_ablation'][0]:>7.2f}% "
            f"{100 * r.accuracy['clean'][1]:>9.2f}% / {100 * r.accuracy['spliced'][1]:.2f}% {_loss_columns(r)}"
        )
    for r in results:
        hurt = [d for d in (class_drops(r.by_class or {}) or [])[:hurt_most] if d["drop_pp"] > 0]
        if hurt:
            lines.append(f"{r.dataset}/{r.split}, classes the splice hurts most: " + "; ".join(
                f"{d['class']} {100 * d['clean']:.0f}% -> {100 * d['spliced']:.0f}%" for d in hurt))
    return "\n".join(lines)
