"""Bulk inserts (``clipscope/db/bulk.py``): on PostgreSQL through COPY, stored as SQLAlchemy's INSERT stores them."""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from clipscope.db.bulk import analyze, gc_paused, insert_columns, insert_rows
from clipscope.db.models import Feature, FeatureExample, Image, Label, Sae, SaeStatus
from clipscope.db.session import session_scope


def _sae(s, key: str) -> int:
    row = Sae(key=key, name=key, status=SaeStatus.TRAINED, model="ViT-B-32", pretrained="none", random_weights=True, layer=10,
              tokens="cls", d_in=768, d_sae=4, k=2, recipe="topk", config={}, provenance={}, metrics={})
    s.add(row)
    s.flush()
    return row.id


def _features(sae_id: int) -> list[dict]:
    return [{
        "sae_id": sae_id, "idx": f, "n_active": 3 * f, "frequency": f / 3, "mean_active": math.pi * f, "max_activation": 1e-300 + f,
        "is_dead": f == 0, "is_dense": f == 3,
        "histogram": {"edges": [0.1, 1 / 3], "counts": [f], "below": 0}, "intervals": [], "neighbours": [[1, 0.123456, "a \"quoted\"\tname"]],
        "classes": None if f % 2 else [{"name": "crème brûlée", "share": 0.5}], "top_class": None if f % 2 else "crème brûlée",
        "top_class_share": None, "auto_name": "back\\slash\nnewline", "auto_score": -0.0, "auto_names": None, "coherence": 0.25 if f else None,
        "output_names": None,
    } for f in range(4)]


def _by_columns(session, table, rows: list[dict]) -> int:
    """``rows`` through :func:`insert_columns`, the integer columns as arrays."""
    columns = {c: [row[c] for row in rows] for c in rows[0]}
    return insert_columns(session, table, {c: np.array(v) if all(type(x) is int for x in v) else v for c, v in columns.items()})


@pytest.mark.parametrize("write", [insert_rows, _by_columns], ids=["rows", "columns"])
def test_rows_are_stored_as_an_insert_stores_them_on_either_engine(db_url, write):
    with session_scope(db_url) as s:
        bulk, plain = _sae(s, "bulk"), _sae(s, "plain")
        image = s.execute(Image.__table__.insert().returning(Image.id), [{
            "dataset": "d", "split": "train", "dataset_key": "k", "index": 0, "label": 0, "class_name": None, "content_hash": "0" * 64,
            "width": 1, "height": 1, "thumbnail": "t/0.webp"}]).scalar_one()
        examples = lambda sae_id: [  # noqa: E731
            {"sae_id": sae_id, "feature": f, "bucket": -1, "rank": r, "image_id": image, "activation": 0.1 * r + f,
             "token_map": bytes(range(256)) if r == 1 else None} for f in range(4) for r in range(3)]
        assert write(s, Feature.__table__, _features(bulk)) == 4
        assert write(s, FeatureExample.__table__, examples(bulk)) == 12
        s.execute(Feature.__table__.insert(), _features(plain))
        s.execute(FeatureExample.__table__.insert(), examples(plain))
        assert insert_rows(s, Label.__table__, iter([])) == 0
    with session_scope(db_url) as s:
        for table, key in ((Feature.__table__, "idx"), (FeatureExample.__table__, "feature, rank")):
            columns = [c.name for c in table.columns if c.name not in ("id", "sae_id")]
            stored = ", ".join(  # the stored text itself (bytes as they are), NULL told apart from JSON null
                f"{c}, {c} IS NULL" if c == "token_map" else f"CAST({c} AS TEXT), {c} IS NULL" for c in columns)
            rows = {sae_id: s.execute(text(f"SELECT {stored} FROM {table.name} WHERE sae_id = :s ORDER BY {key}"), {"s": sae_id}).all()
                    for sae_id in (bulk, plain)}
            assert rows[bulk] == rows[plain] and len(rows[bulk]) in (4, 12), table.name
        read = s.execute(select(Feature).where(Feature.sae_id == bulk).order_by(Feature.idx)).scalars().all()
        assert [f.classes for f in read] == [[{"name": "crème brûlée", "share": 0.5}], None, [{"name": "crème brûlée", "share": 0.5}], None]
        assert read[1].neighbours == [[1, 0.123456, "a \"quoted\"\tname"]] and read[1].auto_name == "back\\slash\nnewline"
        assert read[1].mean_active == math.pi and read[0].max_activation == 1e-300 and read[0].coherence is None
        assert [f.is_dead for f in read] == [True, False, False, False]
        maps = s.scalars(select(FeatureExample.token_map).where(FeatureExample.sae_id == bulk, FeatureExample.rank == 1)).all()
        assert maps == [bytes(range(256))] * 4
        assert s.scalar(select(func.count()).select_from(FeatureExample).where(FeatureExample.sae_id == bulk)) == 12


def test_a_table_copy_cannot_take_as_it_is_goes_through_inserts(db_url):
    from datetime import datetime, timezone

    when = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
    with session_scope(db_url) as s:
        sae_id = _sae(s, "l")
        s.execute(Feature.__table__.insert(), _features(sae_id)[:1])
        assert insert_rows(s, Label.__table__, [{"sae_id": sae_id, "feature": 0, "text": "dumplings", "category": "semantic",
                                                  "author": "a", "revision": 1, "updated_at": when}]) == 1
    with session_scope(db_url) as s:
        assert s.scalar(select(Label.updated_at)) == when
    with pytest.raises(Exception, match="naive datetime"), session_scope(db_url) as s:  # the column type's own check, as INSERT runs it
        insert_rows(s, Label.__table__, [{"sae_id": sae_id, "feature": 1, "text": "x", "category": "noise", "author": "a", "revision": 1,
                                          "updated_at": when.replace(tzinfo=None)}])


@pytest.mark.parametrize("n", [1, 3])
def test_executemany_chunks_hold_every_row(db_url, monkeypatch, n):
    monkeypatch.setattr("clipscope.db.bulk.CHUNK", n)
    with session_scope(db_url) as s:
        sae_id = _sae(s, "c")
        assert insert_rows(s, Feature.__table__, iter(_features(sae_id))) == 4
    with session_scope(db_url) as s:
        assert s.scalars(select(Feature.idx).order_by(Feature.idx)).all() == [0, 1, 2, 3]


def test_columns_of_unequal_lengths_are_refused_before_anything_is_written(db_url):
    with session_scope(db_url) as s:
        sae_id = _sae(s, "u")
        with pytest.raises(ValueError, match="unequal lengths"):
            insert_columns(s, Feature.__table__, {**{c: [row[c] for row in _features(sae_id)] for c in _features(sae_id)[0]}, "idx": [0, 1, 2]})
        assert insert_columns(s, Feature.__table__, {"sae_id": [], "idx": []}) == 0
        assert s.scalar(select(func.count()).select_from(Feature)) == 0


def test_gc_paused_turns_the_collector_off_for_its_block_then_back_as_it_was():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # nested: the outer block keeps it off
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("a failed write")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


def test_analyze_lets_the_foreign_key_checks_use_the_key_where_the_statistics_said_empty(postgres_server):
    """A table analysed while it held pages and no live rows (here: during a write then rolled back) reads as
    empty, and the check of each new example's feature was planned through an index that only starts with
    the SAE: each check read all of the SAE's features."""
    from sqlalchemy import create_engine

    from tests.conftest import fresh_postgresql_database

    url = fresh_postgresql_database(postgres_server)
    engine = create_engine(url)
    with engine.connect() as writer, engine.connect() as other:
        sae_id = _sae(Session(writer), "gone")
        writer.execute(text("INSERT INTO features (sae_id, idx, n_active, frequency, mean_active, max_activation, is_dead, is_dense, histogram, "
                            "intervals, neighbours) SELECT :s, g, 1, 0.1, 0.1, 0.1, false, false, '{}', '[]', '[]' FROM generate_series(0, 19999) g"),
                       {"s": sae_id})
        other.execute(text("ANALYZE features"))
        other.commit()
        writer.rollback()
    engine.dispose()

    def check_plan(s) -> str:  # the generic plan of the lookup PostgreSQL's foreign-key trigger runs for an example's feature
        s.execute(text("SET LOCAL plan_cache_mode = force_generic_plan"))
        s.execute(text("PREPARE fk_check(int, int) AS SELECT 1 FROM ONLY features x WHERE sae_id = $1 AND idx = $2 FOR KEY SHARE OF x"))
        plan = "\n".join(s.execute(text("EXPLAIN EXECUTE fk_check(1, 1)")).scalars())
        s.execute(text("DEALLOCATE fk_check"))
        return plan

    with session_scope(url) as s:
        sae_id = _sae(s, "new")
        insert_columns(s, Feature.__table__, {**{c: [row[c] for row in _features(sae_id)] for c in _features(sae_id)[0]}})
        s.execute(text("INSERT INTO features (sae_id, idx, n_active, frequency, mean_active, max_activation, is_dead, is_dense, histogram, "
                       "intervals, neighbours) SELECT :s, g, 1, 0.1, 0.1, 0.1, false, false, '{}', '[]', '[]' FROM generate_series(4, 19999) g"),
                  {"s": sae_id})
        assert "features_pkey" not in check_plan(s)  # (sae_id, coherence, idx): every feature of the SAE read for each check
        analyze(s, Feature.__table__, Image.__table__)
        assert "Index Cond" in check_plan(s) and "using features_pkey" in check_plan(s)
