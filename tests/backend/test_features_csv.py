"""The feature table as CSV: every feature the list's filters select, in the list's order."""

import csv
import io
import os
import re
import subprocess
import sys

import pytest
from sqlalchemy import select

from backend.services import features as feature_service
from clipscope.db.models import Sae, SaeStatus
from clipscope.db.session import session_scope


def _table(client, key, **params) -> list[dict[str, str]]:
    r = client.get(f"/api/saes/{key}/features.csv", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == f'attachment; filename="{key}-features.csv"'
    return list(csv.DictReader(io.StringIO(r.text)))


def _listed(client, key, **params) -> list[dict]:
    """Every feature of the JSON list, page after page."""
    out, page = [], 1
    while True:
        body = client.get(f"/api/saes/{key}/features", params={**params, "per_page": 7, "page": page}).json()
        out += body["features"]
        if page * 7 >= body["total"]:
            return out
        page += 1


def _cell(value) -> str:
    return "" if value is None else str(value)


@pytest.mark.parametrize("in_list_limit", [5, 2000], ids=["whole-table read", "IN read"])
def test_the_csv_holds_every_selected_feature_in_the_lists_order_with_its_current_label(web, monkeypatch, in_list_limit):
    monkeypatch.setattr(feature_service, "_IN_LIST_LIMIT", in_list_limit)
    client, key = web
    for idx, text in [(3, "red, \"round\"\nthings"), (3, "red circles"), (10, "stripes")]:  # feature 3: a second revision
        base = 1 if text == "red circles" else 0
        r = client.post(f"/api/saes/{key}/features/{idx}/labels", json={"text": text, "category": "visual", "author": "ann", "base_revision": base})
        assert r.status_code == 201, r.text
    for params in [{}, {"sort": "frequency", "order": "desc", "dead": "hide"}, {"labelled": "yes"}, {"sort": "label", "order": "desc"}]:
        rows, listed = _table(client, key, **params), _listed(client, key, **params)
        assert [int(r["index"]) for r in rows] == [f["index"] for f in listed], params
        for row, f in zip(rows, listed):
            for field in ("frequency", "n_active", "mean_active", "max_activation", "is_dead", "is_dense", "top_class", "top_class_share",
                          "auto_name", "auto_score", "coherence"):
                assert row[field] == _cell(f[field]), (params, field)
            label = f["label"] or {}
            assert [row[f"label_{k}"] for k in ("text", "category", "author", "revision", "updated_at")] == [
                _cell(label.get(k)) for k in ("text", "category", "author", "revision", "updated_at")]
    everything = {int(r["index"]): r for r in _table(client, key)}
    assert len(everything) == 64 and list(everything) == list(range(64))
    assert everything[3]["label_text"] == "red circles" and everything[3]["label_revision"] == "2", "the current revision"
    assert float(everything[0]["frequency"]) == _listed(client, key)[0]["frequency"], "floats written exactly"


def test_a_concept_search_adds_each_features_match_in_its_ranking(web, random_clip):
    client, key = web
    rows, listed = _table(client, key, concept="stripes", dense="hide"), _listed(client, key, concept="stripes", dense="hide")
    assert [int(r["index"]) for r in rows] == [f["index"] for f in listed] and len(rows) > 10
    assert [float(r["concept_score"]) for r in rows] == [f["concept_score"] for f in listed]
    assert "concept_score" not in _table(client, key)[0]


def test_the_csv_refuses_what_the_list_refuses(web):
    client, key = web
    assert client.get(f"/api/saes/{key}/features.csv", params={"min_freq": 0.5, "max_freq": 0.1}).status_code == 422
    assert client.get(f"/api/saes/{key}/features.csv", params={"sort": "nonsense"}).status_code == 422
    assert client.get("/api/saes/no-such-sae/features.csv").status_code == 404
    with session_scope(client.app.state.database_url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        sae.precompute = {**sae.precompute, "names": None}
    assert client.get(f"/api/saes/{key}/features.csv", params={"concept": "stripes"}).status_code == 409
    with session_scope(client.app.state.database_url) as s:
        s.query(Sae).filter(Sae.key == key).update({"status": SaeStatus.TRAINED})
    assert client.get(f"/api/saes/{key}/features.csv").status_code == 409


def test_the_list_page_links_its_features_as_csv(web):
    client, key = web
    page = client.get(f"/saes/{key}/features", params={"dead": "hide", "sort": "max", "per_page": 5, "page": 2}).text
    link = f'href="/api/saes/{key}/features.csv?sort=max&amp;dead=hide"'
    assert link in page, "the list's filters and order, without its paging"
    total = int(re.search(r"<h1>Features <span[^>]*>(\d+) of 64", page).group(1))
    assert len(_table(client, key, sort="max", dead="hide")) == total
    nothing = client.get(f"/saes/{key}/features", params={"q": "no label says this"}).text
    assert "features.csv" not in nothing, "no link to an empty table"


def test_clipscope_export_features_writes_the_apis_table(web_data, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from backend.app import create_app
    from backend.services.labels import save_label
    from clipscope.errors import ClipScopeError
    from clipscope.settings import get_settings
    from clipscope_cli.main import app
    from tests.backend.conftest import copy_database

    settings, key = web_data
    url = copy_database(settings, tmp_path / "clipscope.db")
    with session_scope(url) as s:
        save_label(s, s.scalar(select(Sae).where(Sae.key == key)), 5, "blue, \"bright\"", "visual", "ann", 0)
    monkeypatch.setenv("CLIPSCOPE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CLIPSCOPE_DATABASE_URL", url)
    monkeypatch.setenv("CLIPSCOPE_DEVICE", "cpu")
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        out = runner.invoke(app, ["export", key, "--features", "--format", "csv", "-o", str(tmp_path / "f.csv")])
        assert out.exit_code == 0, out.output
        with TestClient(create_app(settings.model_copy(update={"database_url": url}))) as client:
            assert (tmp_path / "f.csv").read_bytes() == client.get(f"/api/saes/{key}/features.csv").content
        as_json = [__import__("json").loads(line) for line in runner.invoke(app, ["export", key, "--features"]).output.splitlines()]
        assert [r["index"] for r in as_json] == list(range(64)) and as_json[5]["label_text"] == 'blue, "bright"'
        assert isinstance(as_json[0]["is_dead"], bool) and isinstance(as_json[0]["frequency"], float)
        probe = ("import sys; from typer.testing import CliRunner; from clipscope_cli.main import app; "
                 f"out = CliRunner().invoke(app, ['export', {key!r}, '--features']); assert out.exit_code == 0, out.output; "
                 "print(len(out.output.splitlines()), 'torch' in sys.modules)")
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env={**os.environ})
        assert proc.stdout.split() == ["64", "False"], ("the feature table is read without torch (3-5 s to import here)", proc.stdout, proc.stderr[-800:])
        with session_scope(url) as s:
            s.query(Sae).filter(Sae.key == key).update({"status": SaeStatus.TRAINED})
        out = runner.invoke(app, ["export", key, "--features"])
        assert isinstance(out.exception, ClipScopeError) and "no feature table yet (status: trained)" in str(out.exception)
    finally:
        get_settings.cache_clear()
