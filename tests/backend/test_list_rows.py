"""The feature list's rows kept per process (``backend/services/list_rows.py``): the pages they write are
the ones the database writes, they follow a new precompute, and a build that fails or reads a
version overtaken by a commit keeps nothing."""

from __future__ import annotations

import datetime as dt

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

import backend.services.list_rows as list_rows
from clipscope.db.models import Feature, Sae
from clipscope.db.session import session_scope
from tests.backend.conftest import with_token
from tests.conftest import copy_data_dir

QUERIES = [
    {}, {"sort": "frequency", "order": "desc"}, {"per_page": 500}, {"labelled": "yes", "sort": "label"}, {"q": "<b>"},
    {"dead": "only"}, {"dense": "hide", "sort": "coherence"}, {"page": 3, "per_page": 7}, {"page": 99}, {"q": "no such label"},
    {"concept": "red stripes"}, {"matched_in": "B"}, {"matched_in": "B", "order": "desc"},
]


@pytest.fixture
def two(two_saes, tmp_path):
    """Two apps over one private copy of ``two_saes``: ``kept`` lists from kept rows once built (and fails if
    it reads the database's), ``read`` always from the database; both with the same labels."""
    from backend.app import create_app

    settings, keys = two_saes
    url = copy_data_dir(settings.data_dir, tmp_path / "data")
    private = settings.model_copy(update={"data_dir": tmp_path / "data", "database_url": url})
    kept, read = create_app(private), create_app(private)
    read.state.list_rows.find = lambda sae: None
    with TestClient(kept) as k, TestClient(read) as r:
        a = keys[0]
        for idx, text, category in ((3, 'fish & <b>"chips"</b>', "semantic"), (5, "it's stripes", "visual"), (7, "noise?", "noise")):
            r.post(f"/saes/{a}/features/{idx}/label", data=with_token(r, text=text, category=category, author="ann", base_revision=0))
        yield k, r, kept, private, keys


def _sae(url: str, key: str) -> Sae:
    with session_scope(url) as s:
        sae = s.scalars(select(Sae).where(Sae.key == key)).one()
        s.expunge(sae)
        return sae


def test_the_kept_rows_write_the_list_pages_the_database_writes(two, monkeypatch):
    k, r, kept, settings, (a, b) = two
    first = k.get(f"/saes/{a}/features")  # starts the build, answered from the database meanwhile
    kept.state.list_rows.wait()
    assert first.text == r.get(f"/saes/{a}/features").text
    assert kept.state.list_rows.find(_sae(settings.database_url, a)) is not None, "the rows are kept once built"

    def no_database(*args, **kwargs):
        raise AssertionError("the list was read from the database, not from the kept rows")

    queries = [{key: b if value == "B" else value for key, value in query.items()} for query in QUERIES]
    expected = [r.get(f"/saes/{a}/features", params=query) for query in queries]
    monkeypatch.setattr(list_rows, "list_features", no_database)  # both apps' module: r reads no list from here on
    for query, want in zip(queries, expected):
        page = k.get(f"/saes/{a}/features", params=query)
        assert page.status_code == want.status_code == 200, query
        assert page.text == want.text, query
    assert 'fish &amp; &lt;b&gt;&#34;chips&#34;&lt;/b&gt;' in k.get(f"/saes/{a}/features", params={"labelled": "yes"}).text
    assert k.get(f"/saes/{a}/features", params={"concept": "red stripes"}).text.count('class="concept-score"') == 50
    assert "<figure>" in k.get(f"/saes/{a}/features").text

    r.post(f"/saes/{a}/features/5/label", data=with_token(r, text="now <i>dots</i>", category="visual", author="ann", base_revision=1))
    assert "now &lt;i&gt;dots&lt;/i&gt;" in k.get(f"/saes/{a}/features").text, "labels are read on every page"


def test_a_new_precompute_is_listed_from_its_own_rows(two):
    k, _, kept, settings, (a, _b) = two
    k.get(f"/saes/{a}/features")
    kept.state.list_rows.wait()
    with session_scope(settings.database_url) as s:  # what a precompute commits: new statistics, a new version
        s.execute(update(Feature).where(Feature.sae_id == _sae(settings.database_url, a).id, Feature.idx == 0).values(frequency=0.123456))
        s.execute(update(Sae).where(Sae.key == a).values(updated_at=dt.datetime(2031, 1, 1, tzinfo=dt.timezone.utc)))
    assert "freq 12.346 %" in k.get(f"/saes/{a}/features").text, "read from the database while the new rows are built"
    kept.state.list_rows.wait()
    assert kept.state.list_rows.find(_sae(settings.database_url, a)) is not None
    assert "freq 12.346 %" in k.get(f"/saes/{a}/features").text, "from the new version's kept rows"


def test_a_failed_build_leaves_the_list_to_the_database_and_is_not_retried(two, monkeypatch, caplog):
    k, r, kept, settings, (a, _b) = two
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("disk gone")

    monkeypatch.setattr(list_rows, "read_kept_rows", broken)
    for _ in range(3):
        assert k.get(f"/saes/{a}/features").text == r.get(f"/saes/{a}/features").text
        kept.state.list_rows.wait()
    assert calls == [1], "one build a version"
    assert "could not be kept" in caplog.text and "disk gone" in caplog.text


def test_rows_read_while_a_precompute_commits_are_not_kept(two, monkeypatch):
    k, _, kept, settings, (a, _b) = two
    real = list_rows.read_kept_rows

    def overtaken(session, sae_id, d_sae):
        rows = real(session, sae_id, d_sae)
        with session_scope(settings.database_url) as other:  # a precompute commits after the reads began
            other.execute(update(Sae).where(Sae.id == sae_id).values(updated_at=dt.datetime(2031, 1, 1, tzinfo=dt.timezone.utc)))
        return rows

    stale = _sae(settings.database_url, a)
    monkeypatch.setattr(list_rows, "read_kept_rows", overtaken)
    k.get(f"/saes/{a}/features")
    kept.state.list_rows.wait()
    monkeypatch.setattr(list_rows, "read_kept_rows", real)
    assert kept.state.list_rows.find(stale) is None, "the overtaken version's rows were dropped"
    k.get(f"/saes/{a}/features")
    kept.state.list_rows.wait()
    assert kept.state.list_rows.find(_sae(settings.database_url, a)) is not None, "the current version builds as usual"
