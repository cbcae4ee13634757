"""Which features a set of images shares: the features that fire on any of them, ranked by how many of
the images each fires on, then by how much more often that is than on the SAE's precompute set.

A feature firing on every image of the set may just be a dense one; the ``lift`` (its share of the
set's images over its firing frequency in the precompute set) tells a feature particular to what the
images have in common from one that fires on nearly everything. Counter-examples sharpen it: given
images *without* the thing, features rank by how much more of the set than of them they fire on.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from backend.services.analyze import Firing
from backend.services.features import label_dict, labels_of, maxima_of, top_examples
from clipscope.db.models import Sae


def _rank(row: dict[str, Any]) -> tuple:
    """With counter-examples the largest contrast first, else the most images; among equals the largest lift,
    features that never fire on the precompute set after those that do (nothing to show of them), then the index."""
    lift, first = row["lift"], row["images"] if row["contrast"] is None else row["contrast"]
    return (-first, lift is None, -(lift or 0.0), row["index"])


def _activations(firings: list[Firing], features: list[int]) -> dict[int, list[float]]:
    """Each of ``features``' activation on every image, 0 where it does not fire."""
    out = {f: [0.0] * len(firings) for f in features}
    for i, firing in enumerate(firings):
        for feature, activation in firing.activations.items():
            if feature in out:
                out[feature][i] = activation
    return out


def features_of_set(session: Session, sae: Sae, firings: list[Firing], without: list[Firing] = (), limit: int = 30,
                    strip: int = 6) -> dict[str, Any]:
    """The ``limit`` features ranked first (:func:`_rank`) among those firing on any of ``firings``, each with its
    activation on every image (0 where it does not fire) and relative to its maximum on the precompute set, the
    number and share of the images it fires on, its firing frequency on the precompute set and the lift, its
    label, automatic name and ``strip`` top images; with counter-examples (``without``), the same of them and the
    contrast (share of the set minus share of the counter-examples). Also how many features fire on all of the set."""
    n, m = len(firings), len(without)
    acts = _activations(firings, sorted({f for firing in firings for f in firing.activations}))
    against = _activations(without, list(acts)) if m else {}
    stats = maxima_of(session, sae.id, list(acts))
    rows = []
    for feature, per_image in acts.items():
        stat = stats.get(feature)
        mx, frequency = (stat.max_activation, stat.frequency) if stat is not None else (0.0, None)
        images = sum(a > 0 for a in per_image)
        row = {
            "index": feature, "images": images, "share": images / n, "activations": per_image,
            "relative": [a / mx for a in per_image] if mx > 0 else None, "max_activation": mx, "frequency": frequency,
            "lift": images / n / frequency if frequency else None, "auto_name": stat.auto_name if stat is not None else None,
            "images_without": None, "activations_without": None, "relative_without": None, "contrast": None,
        }
        if m:
            neg = against[feature]
            row["images_without"] = sum(a > 0 for a in neg)
            row["activations_without"], row["relative_without"] = neg, [a / mx for a in neg] if mx > 0 else None
            row["contrast"] = row["share"] - row["images_without"] / m
        rows.append(row)
    rows.sort(key=_rank)
    shown = rows[:limit]
    ids = [r["index"] for r in shown]
    labels, strips = labels_of(session, sae.id, ids), top_examples(session, sae.id, ids, limit=strip)
    for r in shown:
        r["label"] = label_dict(labels.get(r["index"]))
        r["examples"] = strips.get(r["index"], [])
    return {"images": n, "without": m, "n_active": len(rows), "in_all": sum(r["images"] == n for r in rows), "features": shown}
