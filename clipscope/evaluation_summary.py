"""What the pages and the report read off a stored evaluation (``Evaluation.accuracy``): the loss a
splice recovers and the classes it hurts most. Plain arithmetic on stored numbers, without torch;
the evaluation itself is :mod:`clipscope.clip.zeroshot` and ``worker/evaluate.py``."""

from __future__ import annotations

from typing import Any


def loss_recovered(clean: float | None, spliced: float | None, ablated: float | None) -> float | None:
    """The share of the loss that mean-ablating the site adds which the SAE's reconstruction takes back,
    ``(ablated - spliced) / (ablated - clean)``: 1 when splicing costs nothing, 0 when it is as bad as
    knowing only the mean (below 0 worse still). None without the three losses, or where ablating the
    site costs nothing (nothing to recover)."""
    if clean is None or spliced is None or ablated is None or ablated <= clean:
        return None
    return (ablated - spliced) / (ablated - clean)


def class_drops(by_condition: dict[str, dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Per class, top-1 accuracy clean and spliced, the drop in percentage points, what the spliced
    model most often mistakes the class for, and the features clean CLIP's recognition of it rests on
    most (first-order support, when tallied); the most hurt first. None for an evaluation without
    per-class tallies (made before they were kept)."""
    clean, spliced = by_condition.get("clean"), by_condition.get("spliced")
    if not clean or not spliced:
        return None
    names, supports = clean["classes"], clean.get("features")
    rows = []
    for i, (name, n) in enumerate(zip(names, clean["n"])):
        if not n:
            continue
        other, times = spliced["mistaken_for"][i]
        rows.append({
            "class": name, "n": n, "clean": clean["hits"][i] / n, "spliced": spliced["hits"][i] / n,
            "drop_pp": 100 * (clean["hits"][i] - spliced["hits"][i]) / n,
            "spliced_mistaken_for": {"class": names[other], "share": times / n} if other >= 0 else None,
            "features": [{"index": f, "support": v} for f, v in supports[i]] if supports else None,
        })
    return sorted(rows, key=lambda r: (-r["drop_pp"], r["class"]))
