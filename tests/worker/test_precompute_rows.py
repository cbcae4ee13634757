"""The precompute's rows (``worker/precompute/stage.py``), built a column at a time on arrays, against the
same rows read one feature and one value at a time in plain Python: equal to the last bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipscope.config import PrecomputeConfig
from clipscope.naming import FeatureNames
from worker.precompute.accumulate import FeatureStats, GroupTopK
from worker.precompute.stage import FeatureTables, _example_columns, _feature_columns, _names_of, _rounded

D_SAE, N_IMAGES, CONCEPTS = 9, 50, [f"concept {i}" for i in range(7)]


def _tables(n_int: int, per_interval: int = 3, tokens: int = 0) -> FeatureTables:
    """Random tables with what the write must get right: a feature that never fires, unfilled slots (also
    between filled ones), equal activations among a bucket's samples, concepts missing, NaN coherence."""
    g = torch.Generator().manual_seed(n_int)
    stats = FeatureStats(D_SAE)
    stats.count = torch.randint(1, N_IMAGES, (D_SAE,), generator=g)
    stats.count[2] = 0
    stats.total = torch.rand(D_SAE, generator=g, dtype=torch.float64) * stats.count
    stats.max = torch.rand(D_SAE, generator=g) * 9 + 0.5
    stats.max[2] = 0.0
    top = GroupTopK(D_SAE, 4, extra=tokens)
    top.payload = torch.randint(0, N_IMAGES, (D_SAE, 4), generator=g)
    top.payload[3, 2:] = -1
    top.payload[4, 1] = -1  # a gap between filled slots
    top.payload[2] = -1
    top.values = torch.rand(D_SAE, 4, generator=g)
    if tokens:
        top.extra = torch.randint(0, 256, (D_SAE, 4, tokens), generator=g, dtype=torch.uint8)
    samples = GroupTopK(D_SAE * max(n_int, 1), per_interval)
    samples.payload = torch.randint(0, N_IMAGES, samples.payload.shape, generator=g)
    samples.payload[::4, 0] = -1  # a gap before filled slots: ranks still count 0, 1, ...
    samples.values = (torch.randint(0, 3, samples.values.shape, generator=g) / 4).float()  # many ties
    names = FeatureNames(
        concepts=torch.randint(-1, len(CONCEPTS), (D_SAE, 3), generator=g), scores=torch.randn(D_SAE, 3, generator=g) / 3,
        coherence=torch.where(torch.arange(D_SAE) % 4 == 0, float("nan"), torch.rand(D_SAE, generator=g)), baseline=0.1,
        directions=torch.zeros(D_SAE, 2), output_concepts=torch.randint(0, len(CONCEPTS), (D_SAE, 2), generator=g),
        output_scores=torch.randn(D_SAE, 2, generator=g),
    )
    names.scores[0, 0] = 1 / 128  # a tie at the sixth decimal: half to even, as round() does
    return FeatureTables(
        N_IMAGES, stats, top, samples, torch.randint(0, 9, (D_SAE, 5), generator=g), torch.randint(0, 9, (D_SAE,), generator=g),
        torch.randint(0, 9, (D_SAE, max(n_int, 1)), generator=g), torch.randint(0, D_SAE, (D_SAE, 4), generator=g),
        torch.rand(D_SAE, 4, generator=g) * 2 - 1, names=names, concepts=CONCEPTS,
    )


def _names_by_row(tb: FeatureTables) -> list[dict]:
    idx, scores, coherence = tb.names.concepts.tolist(), tb.names.scores.tolist(), tb.names.coherence.tolist()
    out = []
    for f in range(D_SAE):
        found = [{"name": tb.concepts[c], "score": round(s, 6)} for c, s in zip(idx[f], scores[f]) if c >= 0]
        named = bool(found) and found[0]["score"] > 0
        out.append({
            "auto_name": found[0]["name"] if named else None, "auto_score": found[0]["score"] if found else None, "auto_names": found or None,
            "coherence": None if math.isnan(coherence[f]) else coherence[f],
            "output_names": [{"name": tb.concepts[c], "score": round(s, 6)}
                             for c, s in zip(tb.names.output_concepts[f].tolist(), tb.names.output_scores[f].tolist())],
        })
    return out


def _features_by_row(tb: FeatureTables, pc: PrecomputeConfig, top_classes: list) -> list[dict]:
    count, total, maxima = tb.stats.count.tolist(), tb.stats.total.tolist(), tb.stats.max.tolist()
    hist, below, icounts = tb.hist_counts.tolist(), tb.hist_below.tolist(), tb.interval_counts.tolist()
    named, n_int, ratio = _names_by_row(tb), pc.intervals, pc.histogram_range
    rows = []
    for f in range(D_SAE):
        m = maxima[f]
        width = m / n_int if n_int else 0.0
        rows.append({
            "idx": f, "n_active": count[f], "frequency": count[f] / tb.n_images, "mean_active": total[f] / count[f] if count[f] else 0.0,
            "max_activation": m, "is_dead": count[f] == 0, "is_dense": count[f] / tb.n_images > pc.dense_threshold,
            "histogram": {"edges": [m / ratio * ratio ** (i / pc.histogram_bins) for i in range(pc.histogram_bins + 1)] if m > 0 else [],
                          "counts": hist[f] if m > 0 else [], "below": below[f]},
            "intervals": [{"lo": i * width, "hi": (i + 1) * width, "count": icounts[f][i], "share": icounts[f][i] / count[f] if count[f] else 0.0}
                          for i in range(n_int)] if m > 0 else [],
            "neighbours": [[n, round(c, 6), named[n]["auto_name"]] for n, c in zip(tb.neighbour_idx[f].tolist(), tb.neighbour_cos[f].tolist())],
            "classes": top_classes[f], "top_class": top_classes[f][0]["name"] if top_classes[f] else None,
            "top_class_share": top_classes[f][0]["share"] if top_classes[f] else None, **named[f],
        })
    return rows


def _examples_by_row(tb: FeatureTables, row_to_id: np.ndarray, n_int: int) -> list[tuple]:
    rows = []
    for f in range(D_SAE):
        kept = [(r, v, slot) for slot, (r, v) in enumerate(zip(tb.top.payload[f].tolist(), tb.top.values[f].tolist())) if r >= 0]
        for rank, (r, v, slot) in enumerate(kept):
            token_map = tb.top.extra[f, slot].numpy().tobytes() if tb.top.extra is not None else None
            rows.append((f, -1, rank, int(row_to_id[r]), v, token_map))
    for f in range(D_SAE):
        for b in range(n_int):
            group = f * n_int + b
            picked = sorted(((v, r) for r, v in zip(tb.samples.payload[group].tolist(), tb.samples.values[group].tolist()) if r >= 0), reverse=True)
            rows += [(f, b, rank, int(row_to_id[r]), v, None) for rank, (v, r) in enumerate(picked)]
    return rows


@pytest.mark.parametrize(("n_int", "tokens"), [(3, 0), (0, 0), (2, 5)])
def test_the_columns_equal_the_rows_read_one_value_at_a_time(n_int, tokens):
    tb = _tables(n_int, tokens=tokens)
    pc = PrecomputeConfig(intervals=n_int, per_interval=3, histogram_bins=4, histogram_range=100.0, dense_threshold=0.5)
    top_classes = [[{"name": f"class {f}", "share": f / 10}] if f % 3 else None for f in range(D_SAE)]
    features = _feature_columns(tb, pc, top_classes, _names_of(tb, D_SAE))
    expected = _features_by_row(tb, pc, top_classes)
    assert list(features) == list(expected[0])
    for name, values in features.items():
        assert values == [row[name] for row in expected], name
        assert [type(v) for v in values] == [type(row[name]) for row in expected], name  # 1 is not 1.0 to SQLite

    row_to_id = np.arange(N_IMAGES) * 10 + 7
    examples = _example_columns(42, tb, row_to_id, n_int)
    got = list(zip(examples["feature"], examples["bucket"], examples["rank"], examples["image_id"], examples["activation"], examples["token_map"]))
    assert got == _examples_by_row(tb, row_to_id, n_int) and set(examples["sae_id"]) == {42}
    assert all(type(v) is float for v in examples["activation"]) and all(type(v) is int for v in examples["image_id"])


def test_without_names_every_naming_column_is_empty():
    tb = _tables(3)
    tb.names = None
    assert _names_of(tb, D_SAE) == {c: [None] * D_SAE for c in ("auto_name", "auto_score", "auto_names", "coherence", "output_names")}


def test_rounded_float32_values_are_what_round_gives():
    values = torch.cat([torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 10 ** torch.randint(-7, 3, (200_000,)),
                        torch.tensor([1 / 128, 3 / 128, -1 / 128, 0.0, -0.0, 1.0, 5e-7, float("inf")])])
    assert _rounded(values) == [round(v, 6) for v in values.tolist()]
    with pytest.raises(TypeError, match="float32"):
        _rounded(values.double())
