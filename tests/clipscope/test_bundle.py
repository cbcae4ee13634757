"""One SAE as one file (``clipscope saes export`` / ``import``): the SAEs of ``two_saes`` (tests/conftest.py)
moved into fresh installations, SQLite and PostgreSQL, answer as they did where they were made."""

import gzip
import io
import json
import tarfile

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from clipscope.bundle import MANIFEST, export_bundle, import_bundle
from clipscope.db import migrate
from clipscope.db.models import Image, Sae, SaeOverlap
from clipscope.db.session import session_scope
from clipscope.errors import ClipScopeError
from clipscope.storage import DataLayout
from tests.conftest import autovacuum_off, copy_data_dir, fresh_postgresql_database, planner_statistics
from worker.context import Context
from worker.precompute.overlaps import update_overlaps


def _without_ids(value):
    """An answer with its database ids left out (a new installation numbers its rows anew)."""
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k not in ("id", "image_id", "created_at")}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


def _answers(settings, key) -> dict:
    from backend.app import create_app

    with TestClient(create_app(settings)) as client:
        urls = [f"/api/saes/{key}", f"/api/saes/{key}/features?sort=frequency&order=desc&per_page=100",
                f"/api/saes/{key}/labels.jsonl", f"/api/saes/{key}/labels/summary"]
        urls += [f"/api/saes/{key}/features/{i}" for i in (0, 1, 5, 17)]
        out = {}
        for url in urls:
            answer = client.get(url)
            assert answer.status_code == 200, (url, answer.text[:200])
            out[url] = _without_ids(answer.json()) if answer.headers["content-type"].startswith("application/json") else answer.text
        out["shared"] = out[f"/api/saes/{key}"].pop("shared")
        thumbs = [e["thumbnail"] for e in client.get(f"/api/saes/{key}/features/1").json()["top"]]
        assert thumbs and all(client.get(t).status_code == 200 for t in thumbs)
        out["collage"] = client.get(f"/saes/{key}/features/1/collage.png").content
    return out


@pytest.fixture
def source(two_saes, tmp_path):
    """A private copy of ``two_saes`` with a labelled feature in ``a`` (two revisions), and its settings."""
    from backend.services.labels import save_label

    settings, keys = two_saes
    url = copy_data_dir(settings.data_dir, tmp_path / "source")
    with session_scope(url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == keys[0]))
        save_label(s, sae, 1, "berries", "semantic", "ann", 0)
        save_label(s, sae, 1, "berries on cream", "semantic", "bob", 1)
    return settings.model_copy(update={"data_dir": tmp_path / "source", "database_url": url}), keys


def _fresh(settings, tmp_path, name, url=None):
    data = tmp_path / name
    data.mkdir()
    url = url or f"sqlite:///{data / 'clipscope.db'}"
    migrate.upgrade(url)
    return settings.model_copy(update={"data_dir": data, "database_url": url})


def _move(source, target, key, tmp_path, caches=False):
    bundle = tmp_path / f"{key}.tar"
    with session_scope(source.resolved_database_url) as s:
        export_bundle(s, DataLayout(source.data_dir), key, bundle, caches=caches)
    with session_scope(target.resolved_database_url) as s:
        return import_bundle(s, DataLayout(target.data_dir), bundle), bundle


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_an_sae_moved_to_a_fresh_installation_answers_as_it_did(source, tmp_path, engine, request):
    settings, (a, b) = source
    url = fresh_postgresql_database(request.getfixturevalue("postgres_server")) if engine == "postgresql" else None
    target = _fresh(settings, tmp_path, "target", url)
    kept = DataLayout(settings.data_dir).saes / a / "set-thresholds"
    kept.mkdir(exist_ok=True)
    (kept / "v.npy").write_bytes(b"the notebook's screen")
    if url:
        autovacuum_off(url, "feature_examples")
    (key, added), bundle = _move(settings, target, a, tmp_path)
    assert key == a and added["label_revisions"] == 2 and added["features"] == 64 and added["images"] == 40
    if url:  # the pages that read the examples first find them analysed (clipscope/db/bulk.py:analyze)
        assert planner_statistics(url, "feature_examples") == (added["feature_examples"], True)
    mine, theirs = _answers(settings, a), _answers(target, a)
    assert mine.pop("shared") and theirs.pop("shared") == [], "b is not there: nothing shared yet"
    assert mine == theirs
    moved = DataLayout(target.data_dir).saes / a
    assert (moved / "sae" / "sae_weights.safetensors").read_bytes() == (DataLayout(settings.data_dir).saes / a / "sae" / "sae_weights.safetensors").read_bytes()
    assert not (moved / "checkpoints").exists() and not any(DataLayout(target.data_dir).activations.glob("*")), "no checkpoints, no caches unless asked"
    assert not (moved / "set-thresholds").exists(), "nor what the notebook makes again on first use"
    with tarfile.open(bundle) as tar:
        assert json.loads(tar.extractfile(MANIFEST).read())["sae"]["key"] == a


def test_a_second_sae_shares_the_image_rows_and_thumbnails_here_and_its_overlap_is_measured(source, tmp_path):
    settings, (a, b) = source
    target = _fresh(settings, tmp_path, "target")
    (_, first), _ = _move(settings, target, a, tmp_path)
    (_, second), _ = _move(settings, target, b, tmp_path)
    assert (first["images"], second["images"]) == (40, 0), "b shows 20 of the 40 images a brought"
    with session_scope(target.resolved_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 40
    assert update_overlaps(Context(target), b) == [a]
    with session_scope(target.resolved_database_url) as s:
        assert s.scalar(select(func.count()).select_from(SaeOverlap)) == 2
    assert _answers(settings, b) == _answers(target, b), "shared as where they were made"


def test_the_rows_go_in_with_the_garbage_collector_paused(source, tmp_path, monkeypatch):
    import gc

    import clipscope.bundle as bundle

    settings, (a, _) = source
    real, seen = bundle.insert_rows, []

    def watched(session, table, rows):
        seen.append(gc.isenabled())
        return real(session, table, rows)

    monkeypatch.setattr(bundle, "insert_rows", watched)
    real_add = bundle._add_jsonl
    monkeypatch.setattr(bundle, "_add_jsonl", lambda *args: seen.append(gc.isenabled()) or real_add(*args))
    _move(settings, _fresh(settings, tmp_path, "target"), a, tmp_path)
    assert len(seen) > 8 and not any(seen) and gc.isenabled()  # the export's tables and the import's


def test_rows_written_a_few_lines_at_a_time_read_back_whole(source, tmp_path, monkeypatch):
    import clipscope.bundle as bundle

    settings, (a, _) = source

    def rows(name: str) -> dict[str, list]:
        with session_scope(settings.resolved_database_url) as s:
            export_bundle(s, DataLayout(settings.data_dir), a, tmp_path / name)
        with tarfile.open(tmp_path / name) as tar:
            return {t: list(bundle._rows(tar, t)) for t in ("features", "feature_examples", "images", "labels", "label_revisions")}

    whole = rows("whole.tar")
    monkeypatch.setattr(bundle, "_LINES_PER_WRITE", 3)
    assert rows("by-threes.tar") == whole and len(whole["features"]) > 3 and len(whole["label_revisions"]) == 2


def test_with_caches_the_image_pages_work_where_the_sae_moved(source, tmp_path):
    settings, (a, _) = source
    target = _fresh(settings, tmp_path, "target")
    _move(settings, target, a, tmp_path, caches=True)
    from backend.app import create_app

    with TestClient(create_app(target)) as client:
        image_id = client.get(f"/api/saes/{a}/features/1").json()["top"][0]["image_id"]
        page = client.get(f"/api/saes/{a}/images/{image_id}").json()
        assert page["unavailable"] is None and page["ranked"]["by_activation"]


def test_what_cannot_be_imported_is_refused_before_anything_is(source, tmp_path):
    settings, (a, _) = source
    target = _fresh(settings, tmp_path, "target")
    (_, _), bundle = _move(settings, target, a, tmp_path)
    with session_scope(target.resolved_database_url) as s, pytest.raises(ClipScopeError, match=rf"SAE {a} is already in this database: remove it first"):
        import_bundle(s, DataLayout(target.data_dir), bundle)

    other = _fresh(settings, tmp_path, "other")
    forged = tmp_path / "forged.tar"
    with tarfile.open(bundle) as src, tarfile.open(forged, "w") as out:
        for member in src.getmembers():
            out.addfile(member, src.extractfile(member) if member.isfile() else None)
        info = tarfile.TarInfo("files/saes/someone-else/sae/cfg.json")
        info.size = 2
        out.addfile(info, io.BytesIO(b"{}"))
    with session_scope(other.resolved_database_url) as s, pytest.raises(ClipScopeError, match="is not one of its SAE's files: nothing was imported"):
        import_bundle(s, DataLayout(other.data_dir), forged)
    with session_scope(other.resolved_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Sae)) == 0 and not (other.data_dir / "saes").exists()

    sneaky = tmp_path / "sneaky.tar"  # an image row that points its thumbnail at another file of the server
    with tarfile.open(bundle) as src, tarfile.open(sneaky, "w") as out:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name == "rows/images.jsonl.gz":
                rows = [json.loads(line) for line in gzip.decompress(data).splitlines()]
                rows[0]["thumbnail"] = "thumbnails/../clipscope.db"
                data = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    with session_scope(other.resolved_database_url) as s, pytest.raises(ClipScopeError, match="names the thumbnail 'thumbnails/../clipscope.db', not the one of its content hash"):
        import_bundle(s, DataLayout(other.data_dir), sneaky)
    with session_scope(other.resolved_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Sae)) == 0

    (tmp_path / "not.tar").write_bytes(b"not a tar at all")
    with session_scope(other.resolved_database_url) as s, pytest.raises(ClipScopeError, match="is not a ClipScope bundle"):
        import_bundle(s, DataLayout(other.data_dir), tmp_path / "not.tar")
    old = tmp_path / "old.tar"
    with tarfile.open(bundle) as src, tarfile.open(old, "w") as out:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name == MANIFEST:
                data = json.dumps({**json.loads(data), "schema": "0007"}).encode()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    with session_scope(other.resolved_database_url) as s, pytest.raises(ClipScopeError, match="written at database schema 0007, this ClipScope is at"):
        import_bundle(s, DataLayout(other.data_dir), old)
