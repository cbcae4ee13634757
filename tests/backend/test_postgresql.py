"""The explorer over PostgreSQL (what docker-compose serves) answers as it does over SQLite: every GET of
the JSON API and every page, label writes and an analysis, on copies of one ready database."""

import io
import re
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import create_engine, text

from clipscope.db.models import Base
from tests.backend.conftest import copy_database
from tests.conftest import fresh_postgresql_database


def _copy_to_postgresql(sqlite_url: str, server: str) -> str:
    """A fresh, migrated PostgreSQL database holding every row of the SQLite one, ids and sequences included."""
    url = fresh_postgresql_database(server)
    src, dst = create_engine(sqlite_url), create_engine(url)
    with src.connect() as read, dst.begin() as write:
        for table in Base.metadata.sorted_tables:
            rows = [dict(r._mapping) for r in read.execute(table.select())]
            if rows:
                write.execute(table.insert(), rows)
        for table in Base.metadata.sorted_tables:
            if "id" in table.c:
                write.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), coalesce(max(id), 0) + 1, false) FROM {table.name}"))
    src.dispose()
    dst.dispose()
    return url


@pytest.fixture(scope="module")
def engines(web_data, postgres_server, tmp_path_factory):
    from backend.app import create_app

    settings, key = web_data
    sqlite_url = copy_database(settings, tmp_path_factory.mktemp("engines") / "clipscope.db")
    pg_url = _copy_to_postgresql(sqlite_url, postgres_server)
    apps = [create_app(settings.model_copy(update={"database_url": url})) for url in (sqlite_url, pg_url)]
    with TestClient(apps[0]) as lite, TestClient(apps[1]) as pg:
        yield lite, pg, key


def _both(engines, method: str, url: str, **kw):
    lite, pg, _ = engines
    a, b = getattr(lite, method)(url, **kw), getattr(pg, method)(url, **kw)
    assert a.status_code == b.status_code, (url, a.status_code, b.status_code, b.text[:300])
    return a, b


_TOKENS = re.compile(r'(name="(?:csrf_token|upload|base_revision)"[^>]*value=")[^"]*"')


def test_every_get_of_the_api_and_every_page_answers_the_same(engines):
    lite, _, key = engines
    top = lite.get(f"/api/saes/{key}/features/5").json()["top"][0]
    asked = {
        "/api/saes": [""], "/api/saes/{sae}": [""], "/api/saes/{sae}/features.csv": ["", "?sort=coherence&order=desc&dead=hide"],
        "/api/saes/{sae}/features": [f"?sort={s}&order={o}&per_page=20" for s in ("index", "frequency", "max", "label", "class_share", "coherence", "sample")
                                     for o in ("asc", "desc")] + ["?q=a&labelled=no", "?top_class=red&min_freq=0.01&max_freq=0.9", "?auto_name=e&dense=hide",
                                                                  '?top_class="red circle"&dead=hide', '?auto_name="a circle"'],
        "/api/saes/{sae}/features/{idx}": [""], "/api/saes/{sae}/features/{idx}/matches": [""], "/api/saes/{sae}/features/{idx}/cofiring": [""],
        "/api/saes/{sae}/images/{image_id}": [""], "/api/saes/{sae}/features/{idx}/labels": [""], "/api/saes/{sae}/labels.jsonl": [""],
        "/api/saes/{sae}/labels.csv": [""], "/api/saes/{sae}/labels/summary": [""], "/api/saes/{sae}/classes": [""],
    }
    gets = {path for path, ops in lite.app.openapi()["paths"].items() if "get" in ops}
    assert gets == set(asked), "every GET operation of the API is compared (add a new one here)"
    for path, queries in asked.items():
        for query in queries:
            url = path.format(sae=key, idx=5, image_id=top["image_id"]) + query
            a, b = _both(engines, "get", url)
            assert a.status_code == 200, url
            json = a.headers["content-type"].startswith("application/json")
            assert (a.json() if json else a.text) == (b.json() if json else b.text), url
    for url in ("/", f"/saes/{key}/features?sort=label&order=desc", f"/saes/{key}/features?sort=sample&dead=hide", f"/saes/{key}/features/5",
                f"/saes/{key}/features/5/matches", f"/saes/{key}/features/5/cofiring", f"/saes/{key}/images/{top['image_id']}", f"/saes/{key}/analyze",
                f"/saes/{key}/analyze-set", f"/saes/{key}/classes"):
        a, b = _both(engines, "get", url)
        assert a.status_code == 200 and _TOKENS.sub(r"\1", a.text) == _TOKENS.sub(r"\1", b.text), url


def test_labels_written_and_read_back_the_same(engines):
    _, _, key = engines
    label = {"text": "berries on cream", "category": "semantic", "author": "ann"}
    a, b = _both(engines, "post", f"/api/saes/{key}/features/7/labels", json=label)
    assert a.status_code == 201
    stamped = re.compile(r"\d{4}-\d\d-\d\dT[0-9:.+]+")
    assert stamped.sub("T", a.text) == stamped.sub("T", b.text)
    assert a.json()["created_at"].endswith("+00:00") and b.json()["created_at"].endswith("+00:00"), "times are UTC, written one way on both engines"
    assert _both(engines, "post", f"/api/saes/{key}/features/7/labels", json={**label, "base_revision": 0})[1].status_code == 409
    for url in (f"/api/saes/{key}/features?labelled=yes", f"/api/saes/{key}/features?q=BERRIES", f"/api/saes/{key}/labels/summary"):
        a, b = _both(engines, "get", url)
        assert stamped.sub("T", a.text) == stamped.sub("T", b.text), url
    exported = _both(engines, "get", f"/api/saes/{key}/labels.jsonl")[0].content
    other = exported.replace(b'"feature": 7', b'"feature": 8')
    a, b = _both(engines, "post", f"/api/saes/{key}/labels/import", files={"file": ("l.jsonl", other, "application/x-ndjson")})
    assert a.json() == b.json() == {"added": 1, "skipped": 0}


def test_an_analysis_answers_the_same(engines):
    _, _, key = engines
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, format="PNG")
    a, b = _both(engines, "post", f"/api/saes/{key}/analyze", files={"file": ("x.png", buf.getvalue(), "image/png")})
    assert a.status_code == 200 and a.json() == b.json()


def test_the_features_a_set_of_images_shares_are_the_same(engines):
    _, _, key = engines
    files = []
    for seed in (4, 5, 6):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        files.append(("files", (f"{seed}.png", buf.getvalue(), "image/png")))
    a, b = _both(engines, "post", f"/api/saes/{key}/analyze-set", files=files)
    assert a.status_code == 200 and a.json() == b.json() and a.json()["images"] == 3


def test_the_feature_list_from_its_kept_rows_answers_the_same(engines):
    from sqlalchemy import select

    from clipscope.db.models import Sae
    from clipscope.db.session import session_scope

    lite, pg, key = engines
    for client in (lite, pg):
        client.get(f"/saes/{key}/features")  # starts the build (backend/services/list_rows.py)
        client.app.state.list_rows.wait()
        with session_scope(client.app.state.database_url) as s:
            assert client.app.state.list_rows.find(s.scalars(select(Sae).where(Sae.key == key)).one()) is not None
    for query in ("", "?sort=frequency&order=desc&per_page=500", "?labelled=yes&sort=label"):
        a, b = _both(engines, "get", f"/saes/{key}/features{query}")
        assert a.status_code == 200 and a.text == b.text, query
