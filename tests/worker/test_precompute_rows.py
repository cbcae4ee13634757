"""The precompute's rows (``worker/precompute/stage.py``), built a column at a time on arrays, against the
same rows read one feature and one value at a time in plain Python: equal to the last bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipscope.config import PrecomputeConfig
from clipscope.db.session import json_dumps
from clipscope.naming import FeatureNames
from worker.precompute.accumulate import FeatureStats, GroupTopK
from worker.precompute.rows_reference import example_rows, feature_rows
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


@pytest.mark.parametrize(("n_int", "tokens"), [(3, 0), (0, 0), (2, 5)])
def test_the_columns_equal_the_rows_read_one_value_at_a_time(n_int, tokens):
    tb = _tables(n_int, tokens=tokens)
    pc = PrecomputeConfig(intervals=n_int, per_interval=3, histogram_bins=4, histogram_range=100.0, dense_threshold=0.5)
    top_classes = [[{"name": f"class {f}", "share": f / 10}] if f % 3 else None for f in range(D_SAE)]
    features = {"sae_id": [42] * D_SAE, **_feature_columns(tb, pc, top_classes, _names_of(tb, D_SAE))}
    expected = feature_rows(42, tb, pc, top_classes)
    assert list(features) == list(expected[0])
    for name, values in features.items():
        assert values == [row[name] for row in expected], name
        assert json_dumps(values) == json_dumps([row[name] for row in expected]), name  # types too, nested ones: 1 is not 1.0 to SQLite

    row_to_id = np.arange(N_IMAGES) * 10 + 7
    examples = _example_columns(42, tb, row_to_id, n_int)
    expected = example_rows(42, tb, row_to_id, n_int)
    assert sorted(examples) == sorted(expected[0])
    assert [dict(zip(examples, row)) for row in zip(*examples.values())] == expected
    for name, values in examples.items():
        assert [type(v) for v in values] == [type(row[name]) for row in expected], name


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
