"""The database session's JSON columns and bulk writes (``clipscope/db/session.py``)."""

from __future__ import annotations

import json
import math

import numpy as np

from sqlalchemy import select, text

from clipscope.db import migrate
from clipscope.db.models import Sae, SaeStatus
from clipscope.db.session import bulk_writes, json_dumps, session_scope


def _sae(**metrics) -> Sae:
    return Sae(key="s", name="s", status=SaeStatus.TRAINED, model="ViT-B-32", pretrained="none", random_weights=True, layer=10,
               tokens="cls", d_in=768, d_sae=64, k=8, recipe="topk", config={"nested": {"list": [1, 2.5, "é"]}}, provenance={},
               metrics=metrics)


def test_json_columns_read_back_what_was_written(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade(url)
    metrics = {"evr": 0.8057, "tiny": 1e-05, "third": 1 / 3, "big": 12345678.9, "pair": [1, 2]}
    with session_scope(url) as s:
        s.add(_sae(**metrics))
    with session_scope(url) as s:
        row = s.scalar(select(Sae))
        assert row.metrics == metrics and row.config == {"nested": {"list": [1, 2.5, "é"]}}, "floats to the last bit, text as written"
    assert json_dumps({1: (2, 3)}) == '{"1":[2,3]}', "keys written as strings and tuples as lists, as json.dumps writes them"
    assert json_dumps({"nan": math.nan, "inf": -math.inf}) == '{"nan":null,"inf":null}', "no NaN or Infinity: JSON has none, PostgreSQL refuses them"
    numbers = {"f64": np.float64(1 / 3), "i64": np.int64(7), "list": list(np.geomspace(1, 8, 4))}
    assert json.loads(json_dumps(numbers)) == {"f64": 1 / 3, "i64": 7, "list": [1.0, 2.0, 4.0, 8.0]}, "NumPy's numbers, which json.dumps took as floats"
    assert json_dumps({"big": 2**70}) == json.dumps({"big": 2**70}), "what orjson cannot write, written as json.dumps writes it"


def test_a_value_the_standard_library_wrote_with_nan_still_reads(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade(url)
    with session_scope(url) as s:
        s.add(_sae())
    with session_scope(url) as s:  # what json.dumps wrote into SQLite before orjson
        s.execute(text("""UPDATE saes SET metrics = '{"evr": NaN, "l0": Infinity, "dead_fraction": 0.5}'"""))
    with session_scope(url) as s:
        metrics = s.scalar(select(Sae)).metrics
    assert math.isnan(metrics["evr"]) and metrics["l0"] == math.inf and metrics["dead_fraction"] == 0.5


def test_a_bulk_write_gets_a_large_sqlite_cache_for_its_block_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade(url)
    cache = lambda s: s.connection().exec_driver_sql("PRAGMA cache_size").scalar()  # noqa: E731
    with session_scope(url) as s:
        before = cache(s)
        with bulk_writes(s):
            assert cache(s) == -256 * 1024, "256 MB, in KiB"
            s.add(_sae())
        assert cache(s) == before
    with session_scope(url) as s:
        try:
            with bulk_writes(s):
                raise RuntimeError("a write that fails")
        except RuntimeError:
            pass
        assert cache(s) == before, "put back on failure too"
        assert s.scalar(select(Sae.key)) == "s"
