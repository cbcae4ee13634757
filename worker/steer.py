"""Steering over a labelled set: CLIP's zero-shot accuracy with SAE features edited in every image's
residual stream, against clean CLIP on the same images. A question, not a stage: the answer is
printed (and written as JSON on request), never stored.

Where the explorer edits one uploaded image, this asks what an edit does to a whole class: remove
the features a class's recognition rests on (the overview's "rests on" links, the evaluation's
per-class support) and see whether that class, and only that class, is lost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from clipscope.clip.hooks import continue_from, residual_at
from clipscope.clip.loading import LoadedClip
from clipscope.clip.zeroshot import correct_at_k, zero_shot_logits
from clipscope.config import DatasetSpec, RunConfig
from clipscope.sae.model import TopKSAE
from clipscope.feature_edits import Edit
from clipscope.steering import edit_stream
from worker.batches import autocast
from worker.context import Context
from worker.evaluate import per_class
from worker.zero_shot_set import zero_shot_set

CONDITIONS = ("clean", "edited")


@dataclass
class SteerResult:
    dataset: str
    split: str
    n: int
    templates: str
    edits: list[Edit]
    accuracy: dict[str, tuple[float, float]]
    """``clean`` and ``edited``: (top-1, top-5), fractions."""
    by_class: dict[str, dict[str, Any]]
    """Per condition, per class: ``classes``, ``n``, ``hits``, ``mistaken_for`` (``worker.evaluate.per_class``)."""
    fired: list[float]
    """Per edit: the share of images on which the feature fires before the edit."""
    mean_activation: list[float]
    """Per edit: the feature's mean activation over the images before the edit (its largest over the SAE's tokens)."""

    def class_changes(self) -> list[dict[str, Any]]:
        """Per class with images: top-1 accuracy clean and edited, the change in percentage points, and
        what the edited model most often mistakes the class for; the most lowered first."""
        clean, edited = self.by_class["clean"], self.by_class["edited"]
        names, rows = clean["classes"], []
        for i, n in enumerate(clean["n"]):
            if n:
                other, times = edited["mistaken_for"][i]
                rows.append({"class": names[i], "n": n, "clean": clean["hits"][i] / n, "edited": edited["hits"][i] / n,
                             "change_pp": 100 * (edited["hits"][i] - clean["hits"][i]) / n,
                             "edited_mistaken_for": {"class": names[other], "share": times / n} if other >= 0 else None})
        return sorted(rows, key=lambda r: (r["change_pp"], r["class"]))

    def as_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k not in ("edits", "by_class")},
                "edits": [{"index": e.feature, "op": "scale" if e.scale else "set", "value": e.value} for e in self.edits],
                "classes": self.class_changes()}


def steer_dataset(ctx: Context, cfg: RunConfig, clip: LoadedClip, sae: TopKSAE, spec: DatasetSpec, edits: list[Edit]) -> SteerResult:
    """Clean and edited zero-shot predictions for every labelled image of one set, with the
    evaluation's prompts and precision."""
    labelled = zero_shot_set(ctx, cfg, clip, spec, "steering")
    k = len(labelled.classes)
    correct = {c: {1: 0, 5: 0} for c in CONDITIONS}
    confusion = {c: torch.zeros(k * k, dtype=torch.long, device=ctx.device) for c in CONDITIONS}
    fired = torch.zeros(len(edits), device=ctx.device)
    total = torch.zeros(len(edits), dtype=torch.float64, device=ctx.device)
    n = 0
    with torch.inference_mode():
        for images, labels in labelled.batches():
            with autocast(ctx.device, cfg.evaluate.precision):
                resid = residual_at(clip.visual, images, cfg.model.layer)
                edited, before, _ = edit_stream(sae, resid, cfg.model.tokens, edits)
                both = continue_from(clip.visual, torch.cat([resid, edited]), cfg.model.layer).float()
            logits = dict(zip(CONDITIONS, zero_shot_logits(clip.model, both, labelled.classifier).split(len(labels))))
            for c, lg in logits.items():
                for top, hits in correct_at_k(lg, labels).items():
                    correct[c][top] += hits
                confusion[c] += torch.bincount(labels * k + lg.argmax(dim=1), minlength=k * k)
            fired += (before > 0).sum(0)
            total += before.double().sum(0)
            n += len(labels)
    return SteerResult(spec.name, spec.split, n, labelled.templates, list(edits), {c: (correct[c][1] / n, correct[c][5] / n) for c in CONDITIONS},
                       per_class(labelled.classes, confusion), (fired / n).tolist(), (total / n).tolist())


def format_steer(results: list[SteerResult], most: int = 5) -> str:
    """Per set: accuracy clean and edited, how often each edited feature fires there, and the ``most``
    classes the edit lowers and raises most."""
    lines = []
    for r in results:
        (c1, c5), (e1, e5) = r.accuracy["clean"], r.accuracy["edited"]
        lines.append(f"{r.dataset}/{r.split} ({r.n} images): top-1 {100 * c1:.2f}% -> {100 * e1:.2f}% ({100 * (e1 - c1):+.2f} pp), "
                     f"top-5 {100 * c5:.2f}% -> {100 * e5:.2f}%")
        for e, share, mean in zip(r.edits, r.fired, r.mean_activation):
            lines.append(f"  #{e.feature} {'*' if e.scale else '='} {e.value:g}: fires on {100 * share:.1f}% of the images, mean activation {mean:.3g}")
        changes = r.class_changes()
        for title, rows in (("lowered most", [x for x in changes if x["change_pp"] < 0][:most]),
                            ("raised most", [x for x in reversed(changes) if x["change_pp"] > 0][:most])):
            if rows:
                lines.append(f"  classes {title}: " + "; ".join(
                    f"{x['class']} {100 * x['clean']:.0f}% -> {100 * x['edited']:.0f}%"
                    + (f" (now taken for {x['edited_mistaken_for']['class']})" if x["change_pp"] < 0 and x["edited_mistaken_for"] else "")
                    for x in rows))
    return "\n".join(lines)
