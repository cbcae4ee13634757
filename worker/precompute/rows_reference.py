"""The precompute's rows read one feature and one value at a time in plain Python, as dicts.

``worker/precompute/stage.py`` builds the same rows as columns on arrays; they must be equal to the
last bit and of the same Python types (``tests/worker/test_precompute_rows.py``), and
``bench/precompute_write.py`` times the write against these rows going in through SQLAlchemy's
executemany. Nothing else uses this module.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from clipscope.config import PrecomputeConfig
from worker.precompute.stage import FeatureTables


def feature_rows(sae_id: int, tb: FeatureTables, pc: PrecomputeConfig, top_classes: list) -> list[dict[str, Any]]:
    count, total, maxima = tb.stats.count.tolist(), tb.stats.total.tolist(), tb.stats.max.tolist()
    hist, below, icounts = tb.hist_counts.tolist(), tb.hist_below.tolist(), tb.interval_counts.tolist()
    named, n_int, ratio = _names(tb, len(count)), pc.intervals, pc.histogram_range
    rows = []
    for f in range(len(count)):
        m = maxima[f]
        width = m / n_int if n_int else 0.0
        rows.append({
            "sae_id": sae_id, "idx": f, "n_active": count[f], "frequency": count[f] / tb.n_images,
            "mean_active": total[f] / count[f] if count[f] else 0.0, "max_activation": m, "is_dead": count[f] == 0,
            "is_dense": count[f] / tb.n_images > pc.dense_threshold,
            "histogram": {"edges": [m / ratio * ratio ** (i / pc.histogram_bins) for i in range(pc.histogram_bins + 1)] if m > 0 else [],
                          "counts": hist[f] if m > 0 else [], "below": below[f]},
            "intervals": [{"lo": i * width, "hi": (i + 1) * width, "count": icounts[f][i], "share": icounts[f][i] / count[f] if count[f] else 0.0}
                          for i in range(n_int)] if m > 0 else [],
            "neighbours": [[n, round(c, 6), named[n]["auto_name"]] for n, c in zip(tb.neighbour_idx[f].tolist(), tb.neighbour_cos[f].tolist())],
            "classes": top_classes[f], "top_class": top_classes[f][0]["name"] if top_classes[f] else None,
            "top_class_share": top_classes[f][0]["share"] if top_classes[f] else None, **named[f],
        })
    return rows


def example_rows(sae_id: int, tb: FeatureTables, row_to_id: np.ndarray, n_int: int) -> list[dict[str, Any]]:
    """Each feature's filled top slots (bucket -1), then each of its buckets' samples by activation, then image row, both descending."""
    rows = []
    d_sae = len(tb.top.payload)
    for f in range(d_sae):
        kept = [(r, v, slot) for slot, (r, v) in enumerate(zip(tb.top.payload[f].tolist(), tb.top.values[f].tolist())) if r >= 0]
        for rank, (r, v, slot) in enumerate(kept):
            token_map = tb.top.extra[f, slot].numpy().tobytes() if tb.top.extra is not None else None
            rows.append(_example(sae_id, f, -1, rank, int(row_to_id[r]), v, token_map))
    for f in range(d_sae if n_int else 0):
        for b in range(n_int):
            group = f * n_int + b
            picked = sorted(((v, r) for r, v in zip(tb.samples.payload[group].tolist(), tb.samples.values[group].tolist()) if r >= 0), reverse=True)
            rows += [_example(sae_id, f, b, rank, int(row_to_id[r]), v, None) for rank, (v, r) in enumerate(picked)]
    return rows


def _example(sae_id: int, feature: int, bucket: int, rank: int, image_id: int, activation: float, token_map: bytes | None) -> dict[str, Any]:
    return {"sae_id": sae_id, "feature": feature, "bucket": bucket, "rank": rank, "image_id": image_id, "activation": activation,
            "token_map": token_map}


def _names(tb: FeatureTables, d_sae: int) -> list[dict[str, Any]]:
    if tb.names is None:
        return [dict.fromkeys(("auto_name", "auto_score", "auto_names", "coherence", "output_names"))] * d_sae
    idx, scores, coherence = tb.names.concepts.tolist(), tb.names.scores.tolist(), tb.names.coherence.tolist()
    out = []
    for f in range(d_sae):
        found = [{"name": tb.concepts[c], "score": round(s, 6)} for c, s in zip(idx[f], scores[f]) if c >= 0]
        named = bool(found) and found[0]["score"] > 0
        out.append({
            "auto_name": found[0]["name"] if named else None, "auto_score": found[0]["score"] if found else None, "auto_names": found or None,
            "coherence": None if math.isnan(coherence[f]) else coherence[f],
            "output_names": [{"name": tb.concepts[c], "score": round(s, 6)}
                             for c, s in zip(tb.names.output_concepts[f].tolist(), tb.names.output_scores[f].tolist())]
            if tb.names.output_concepts is not None else None,
        })
    return out
