"""Which features a set of images shares: the explorer's "several images" page and the notebook's
``OpenedSae.shared`` rank the same way, here.

Every feature that fires on any image of the set is a row, ranked by how many of the images it fires
on, then by its ``lift``: that share over its firing frequency on the SAE's precompute set, which tells
a feature particular to what the images have in common from one that fires on nearly everything.
Counter-examples (images *without* the thing) sharpen it: the rows then rank by the ``contrast``, the
share of the images a feature fires on minus the share of the counter-examples, then by lift.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

Activations = Mapping[int, float]
"""One image's firing features: ``{feature: activation}`` (the maximum over the tokens the SAE reads)."""


def _rank(row: dict[str, Any]) -> tuple:
    """With counter-examples the largest contrast first, else the most images; among equals the largest lift,
    features that never fire on the precompute set after those that do (nothing to show of them), then the index."""
    lift, first = row["lift"], row["images"] if row["contrast"] is None else row["contrast"]
    return (-first, lift is None, -(lift or 0.0), row["index"])


def _per_image(images: Sequence[Activations], features: list[int]) -> dict[int, list[float]]:
    """Each of ``features``' activation on every image, 0 where it does not fire."""
    out = {f: [0.0] * len(images) for f in features}
    for i, image in enumerate(images):
        for feature, activation in image.items():
            if feature in out:
                out[feature][i] = activation
    return out


def rank_set(images: Sequence[Activations], without: Sequence[Activations], stats: Mapping[int, tuple[float, float]]) -> list[dict[str, Any]]:
    """Every feature firing on any of ``images``, ranked (:func:`_rank`). ``stats`` holds each feature's
    ``(max_activation, frequency)`` on the precompute set (a feature missing from it has neither). A row has the
    feature's activation on every image (0 where it does not fire) and relative to its maximum, the number and
    share of the images it fires on, its frequency and the lift; with counter-examples, the same of them and the
    contrast (else those are None)."""
    n, m = len(images), len(without)
    acts = _per_image(images, sorted({f for image in images for f in image}))
    against = _per_image(without, list(acts))
    rows = []
    for feature, per_image in acts.items():
        mx, frequency = stats.get(feature, (0.0, None))
        count = sum(a > 0 for a in per_image)
        row = {
            "index": feature, "images": count, "share": count / n, "activations": per_image,
            "relative": [a / mx for a in per_image] if mx > 0 else None, "max_activation": mx, "frequency": frequency,
            "lift": count / n / frequency if frequency else None,
            "images_without": None, "activations_without": None, "relative_without": None, "contrast": None,
        }
        if m:
            neg = against[feature]
            row["images_without"] = sum(a > 0 for a in neg)
            row["activations_without"], row["relative_without"] = neg, [a / mx for a in neg] if mx > 0 else None
            row["contrast"] = row["share"] - row["images_without"] / m
        rows.append(row)
    return sorted(rows, key=_rank)
