"""Listing the SAEs of a data dir and removing one with what only it used (``clipscope saes``), on the two
SAEs of ``two_saes`` (tests/conftest.py): ``a`` precomputed over all 40 images, ``b`` over the first 20."""

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text

from clipscope.db.models import Evaluation, Feature, FeatureExample, Image, Label, LabelRevision, Sae, SaeOverlap, TrainingPoint
from clipscope.db.session import session_scope
from clipscope.errors import ClipScopeError
from clipscope.inventory import FILES_ONLY, folder_bytes, list_saes, plan_removal, remove_caches, remove_sae
from clipscope.storage import DataLayout
from tests.conftest import copy_data_dir, fresh_postgresql_database

PER_SAE = (Feature, FeatureExample, Label, LabelRevision, TrainingPoint, Evaluation)


@pytest.fixture
def copied(two_saes, tmp_path):
    """A private copy of the data dir: layout, database URL, keys, settings."""
    settings, keys = two_saes
    url = copy_data_dir(settings.data_dir, tmp_path / "data")
    return DataLayout(tmp_path / "data"), url, keys, settings.model_copy(update={"data_dir": tmp_path / "data", "database_url": url})


def _label(url: str, key: str, feature: int = 1) -> None:
    from backend.services.labels import save_label

    with session_scope(url) as s:
        save_label(s, s.scalar(select(Sae).where(Sae.key == key)), feature, "berries", "semantic", "ann", 0)


def _rows(url: str, sae_id: int) -> dict[str, int]:
    with session_scope(url) as s:
        return {t.__tablename__: s.scalar(select(func.count()).select_from(t).where(t.sae_id == sae_id)) for t in PER_SAE}


def _images_by_sae(url: str) -> dict[int, set[int]]:
    with session_scope(url) as s:
        pairs = s.execute(select(FeatureExample.sae_id, FeatureExample.image_id).distinct()).all()
    out: dict[int, set[int]] = {}
    for sae_id, image_id in pairs:
        out.setdefault(sae_id, set()).add(image_id)
    return out


def _remove(layout, url, keys, discard_labels=False, caches=False):
    with session_scope(url) as s:
        plan = plan_removal(s, layout, keys, discard_labels)
    done = []
    for one in plan.saes:
        with session_scope(url) as s:
            done.append(remove_sae(s, layout, one))
    if caches:
        remove_caches(plan.own_caches)
    return plan, done


def test_the_list_names_each_sae_with_its_metrics_labels_and_disk_and_folders_without_a_row(copied):
    layout, url, (a, b), _ = copied
    _label(url, b)
    (layout.saes / "cut-short-123" / "sae").mkdir(parents=True)
    (layout.saes / "cut-short-123" / "sae" / "cfg.json").write_text("{}")
    with session_scope(url) as s:
        entries = {e.key: e for e in list_saes(s, layout)}
        metrics = {r.key: r.metrics for r in s.scalars(select(Sae))}
    assert list(entries) == [b, a, "cut-short-123"], "newest first, then the folders no row names"
    assert (entries[a].d_sae, entries[b].d_sae, entries[a].status) == (64, 48, "ready")
    assert entries[a].evr == metrics[a]["evr"] and entries[b].l0 == metrics[b]["l0"]
    assert (entries[a].labelled, entries[b].labelled, entries[b].revisions) == (0, 1, 1)
    own = sum(p.stat().st_size for p in (layout.saes / a).rglob("*") if p.is_file())
    assert entries[a].disk_bytes == own > 0
    (shared,) = entries[a].caches
    assert entries[b].caches[0] == shared and len(entries[b].caches) == 2, "b trained on a's cache, precomputed on its own of 20 images"
    assert entries["cut-short-123"].status == FILES_ONLY and entries["cut-short-123"].disk_bytes == 2


def test_removing_an_sae_takes_its_rows_files_and_the_images_only_it_shows_and_leaves_the_other_whole(copied):
    layout, url, (a, b), settings = copied
    _label(url, a)
    _label(url, b)
    with session_scope(url) as s:
        ids = dict(s.execute(select(Sae.key, Sae.id)).all())
    by_sae = _images_by_sae(url)
    only_a, shared = by_sae[ids[a]] - by_sae[ids[b]], by_sae[ids[a]] & by_sae[ids[b]]
    assert only_a and shared, "the fixture has images of both kinds"
    kept_twice, one_shared = min(only_a), min(shared)
    with session_scope(url) as s:  # the same pixels in two images (two datasets): one thumbnail, shown by an image b keeps
        s.get(Image, one_shared).thumbnail = s.get(Image, kept_twice).thumbnail
    with session_scope(url) as s:
        thumbs = dict(s.execute(select(Image.id, Image.thumbnail)).all())
    b_rows = _rows(url, ids[b])
    (layout.collages / a).mkdir(parents=True, exist_ok=True)
    (layout.collages / a / "x.png").write_bytes(b"png")

    with pytest.raises(ClipScopeError, match=rf"SAE {a} has 1 label revision \(1 labelled feature\).*clipscope export {a}.*--discard-labels"):
        _remove(layout, url, [a])
    assert _rows(url, ids[a])["labels"] == 1 and (layout.saes / a).is_dir(), "refused: nothing removed"

    with session_scope(url) as s:
        assert s.scalar(select(func.count()).select_from(SaeOverlap)) == 2, "a's features in b, b's in a"
    plan, (done,) = _remove(layout, url, [a], discard_labels=True)
    assert plan.own_caches == [], "b still reads the cache"
    assert _rows(url, ids[a]) == dict.fromkeys(_rows(url, ids[a]), 0)
    assert _rows(url, ids[b]) == b_rows
    with session_scope(url) as s:
        assert s.scalar(select(Sae).where(Sae.key == a)) is None and s.scalar(select(func.count()).select_from(SaeOverlap)) == 0
        left = set(s.scalars(select(Image.id)))
    assert left == set(thumbs) - only_a and shared <= left
    assert (done.images, done.thumbnails, done.revisions, done.features) == (len(only_a), len(only_a) - 1, 1, 64)
    assert all((layout.root / thumbs[i]).is_file() for i in left)
    assert not any((layout.root / thumbs[i]).exists() for i in only_a - {kept_twice})
    assert not (layout.saes / a).exists() and not (layout.collages / a).exists() and (layout.saes / b).is_dir()

    from backend.app import create_app

    with TestClient(create_app(settings)) as client:
        assert client.get(f"/api/saes/{a}").status_code == 404
        top = client.get(f"/api/saes/{b}/features/1").json()["top"]
        assert top and all(client.get(e["thumbnail"]).status_code == 200 for e in top)
        assert client.get(f"/saes/{b}/features/1/collage.png").status_code == 200


def test_caches_go_only_when_asked_and_when_no_remaining_sae_reads_them(copied):
    layout, url, (a, b), _ = copied
    with session_scope(url) as s:
        shared, of_b = list_saes(s, layout)[0].caches
        assert plan_removal(s, layout, [a]).own_caches == [], "b still reads a's only cache"
        assert [(p.name, n) for p, n in plan_removal(s, layout, [b]).own_caches] == [(of_b, folder_bytes(layout.activations / of_b))]
        together = plan_removal(s, layout, [a, b, a])
    assert [r.entry.key for r in together.saes] == [a, b], "a key named twice is removed once"
    assert [p.name for p, _ in together.own_caches] == [shared, of_b]
    _remove(layout, url, [a, b])
    assert (layout.activations / shared).is_dir() and (layout.activations / of_b).is_dir(), "kept unless asked"
    with session_scope(url) as s:
        assert list_saes(s, layout) == [] and s.scalar(select(func.count()).select_from(Image)) == 0
    assert not any(layout.thumbnails.rglob("*.webp")), "no image row is left, so no thumbnail"


def test_removing_both_with_caches_frees_the_cache_and_a_folder_without_a_row_is_removed_too(copied):
    layout, url, (a, b), _ = copied
    (layout.saes / "cut-short-123").mkdir()
    _, done = _remove(layout, url, [a, b, "cut-short-123"], caches=True)
    assert not any(layout.activations.iterdir())
    assert [d.key for d in done] == [a, b, "cut-short-123"] and not any(layout.saes.iterdir())


def test_a_key_that_names_nothing_is_refused_before_anything_goes_and_one_that_is_no_folder_name_touches_no_file(copied):
    layout, url, (a, b), _ = copied
    with session_scope(url) as s:
        with pytest.raises(ClipScopeError, match=rf"No SAE 'nope' in the database or under .*; there are: {b}, {a}\."):
            plan_removal(s, layout, [a, "nope"])
    assert (layout.saes / a).is_dir() and _rows(url, 1)["features"] == 64
    with session_scope(url) as s:
        s.scalar(select(Sae).where(Sae.key == b)).key = "../b"  # a row no pipeline writes
    (layout.root / "b").mkdir()
    (layout.root / "b" / "keep.txt").write_text("mine")
    with session_scope(url) as s:
        entries = {e.key: e for e in list_saes(s, layout)}
    assert entries["../b"].disk_bytes == 0 and entries[b].status == FILES_ONLY, "its folder is one no row names now"
    _remove(layout, url, ["../b"])
    assert (layout.root / "b" / "keep.txt").read_text() == "mine" and (layout.saes / b).is_dir()


def test_removal_on_postgresql_takes_the_same_rows_as_on_sqlite(copied, postgres_server):
    from tests.backend.test_postgresql import _copy_to_postgresql

    layout, url, (a, b), _ = copied
    _label(url, a)
    pg_url = _copy_to_postgresql(url, postgres_server)
    from backend.services.saes import match_ranking

    ranked = []
    for engine_url in (url, pg_url):  # the stored cosines read back alike (a binary column on PostgreSQL)
        with session_scope(engine_url) as s:
            ranked.append(match_ranking(s, s.scalar(select(Sae).where(Sae.key == a)), b, descending=False).scores)
    assert np.array_equal(ranked[0], ranked[1], equal_nan=True) and not np.isnan(ranked[0]).all()
    counts = {}
    for engine_url in (url, pg_url):
        _remove(layout, engine_url, [a], discard_labels=True)
        engine = create_engine(engine_url)
        with engine.connect() as conn:
            tables = (Sae.__table__, Image.__table__, SaeOverlap.__table__, *[m.__table__ for m in PER_SAE])
            counts[engine_url] = {t.name: conn.execute(select(func.count()).select_from(t)).scalar() for t in tables}
        engine.dispose()
    assert counts[url] == counts[pg_url] and counts[url]["saes"] == 1

    from clipscope.db.vacuum import vacuum

    engine = create_engine(pg_url)
    size = "SELECT pg_total_relation_size('feature_examples')"
    with engine.connect() as conn:
        before = conn.execute(text(size)).scalar()
    vacuum(pg_url)
    with engine.connect() as conn:
        assert conn.execute(text(size)).scalar() < before, "VACUUM FULL gives the removed rows' space back"
    engine.dispose()


def test_a_key_that_names_nothing_is_said_without_the_database_password(postgres_server):
    from clipscope.inventory import sae_row

    url = fresh_postgresql_database(postgres_server).replace("clipscope@", "clipscope:hunter2@")  # trust auth: any password passes
    with session_scope(url) as s, pytest.raises(ClipScopeError) as caught:
        sae_row(s, "nope")
    assert "No SAE 'nope' in postgresql+psycopg://clipscope:***@/" in str(caught.value) and "hunter2" not in str(caught.value)
    assert str(caught.value).endswith("; it has none yet (`clipscope run CONFIG` makes one).")
