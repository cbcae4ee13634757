"""Which classes of the precompute set an SAE's live features lead (``/saes/{sae}/classes`` and its API), and the
list's exact-name search ("..." in double quotes) its links use."""

import re
from urllib.parse import unquote

from sqlalchemy import select

from backend.services.classes import class_coverage
from clipscope.db.models import Feature, Sae
from clipscope.db.session import session_scope


def _live(client, key):
    with session_scope(client.app.state.database_url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        rows = s.execute(select(Feature.idx, Feature.top_class, Feature.classes).where(Feature.sae_id == sae.id, Feature.is_dead.is_(False))).all()
        return rows, list(sae.precompute["classes"])


def _total(client, key, **params):
    return int(re.search(r"<h1>Features <span class=\"muted small\">(\d+) of", client.get(f"/saes/{key}/features", params=params).text).group(1))


def test_each_class_leads_the_features_whose_leading_class_it_is(web):
    client, key = web
    rows, classes = _live(client, key)
    got = client.get(f"/api/saes/{key}/classes").json()
    assert got["n_classes"] == len(classes) and got["live"] == len(rows)
    for entry in got["classes"]:
        mine = [(idx, classes[0]) for idx, name, classes in rows if name == entry["name"]]
        assert all(lead["name"] == entry["name"] for _, lead in mine), "the leading class is the first of a feature's classes"
        score, best = max(((lead["share"] * lead["of_class"], -idx) for idx, lead in mine))
        assert entry["features"] == len(mine) and entry["best"]["index"] == -best
        assert entry["best"]["share"] * entry["best"]["of_class"] == score
    assert [e["features"] for e in got["classes"]] == sorted((e["features"] for e in got["classes"]), reverse=True)
    assert sum(e["features"] for e in got["classes"]) == sum(1 for _, name, _ in rows if name is not None)
    assert got["without"] == [c for c in classes if c not in {name for _, name, _ in rows}]
    page = client.get(f"/saes/{key}/classes").text
    assert ("lead none" in page) == bool(got["without"]) and f'href="/saes/{key}/classes"' in client.get(f"/saes/{key}/features").text
    links = re.findall(r'<td><a href="/saes/[^/]+/features\?([^"]+)">([^<]+)</a></td>', page)
    assert [name for _, name in links] == [e["name"] for e in got["classes"]]
    for query, name in links[:3]:  # each class's link lists exactly the live features it leads
        params = dict(p.split("=", 1) for p in unquote(query.replace("&amp;", "&").replace("+", " ")).split("&"))
        assert params["top_class"] == f'"{name}"'
        assert _total(client, key, **params) == next(e["features"] for e in got["classes"] if e["name"] == name)


def test_a_quoted_search_matches_the_whole_text_only(web):
    client, key = web
    rows, _ = _live(client, key)
    name = max({n for _, n, _ in rows if n}, key=lambda n: sum(1 for _, m, _ in rows if m and n in m and m != n))
    word = name.split()[-1]  # e.g. "circle": in several class names
    assert _total(client, key, top_class=word, dead="hide") > _total(client, key, top_class=f'"{word}"', dead="hide")
    assert _total(client, key, top_class=f'"{name.upper()}"', dead="hide") == sum(1 for _, n, _ in rows if n == name), "case-insensitive"
    idx = rows[0][0]
    assert client.post(f"/api/saes/{key}/features/{idx}/labels", json={"text": "blue things", "category": "visual", "author": "ann"}).status_code == 201
    assert _total(client, key, q='"blue"') == 0 and _total(client, key, q='"Blue Things"') == 1 and _total(client, key, q="blue") == 1


def test_the_best_feature_of_a_class_covers_it_not_a_pure_one_that_fires_once(web):
    client, key = web
    rows, _ = _live(client, key)
    a, b = [idx for idx, name, _ in rows if name][:2]
    with session_scope(client.app.state.database_url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        for idx, share, of_class in ((a, 1.0, 0.01), (b, 0.8, 0.5)):  # a: one image, all in the class; b: most of the class
            f = s.scalar(select(Feature).where(Feature.sae_id == sae.id, Feature.idx == idx))
            f.top_class, f.top_class_share = "zebra", share
            f.classes = [{"label": 99, "name": "zebra", "count": 1, "share": share, "of_class": of_class, "mean": 1.0}]
        sae.name = sae.name + " "  # as a precompute does, the row's update moves updated_at
    (zebra,) = [e for e in client.get(f"/api/saes/{key}/classes").json()["classes"] if e["name"] == "zebra"]
    assert zebra["features"] == 2 and zebra["best"] == {"index": b, "share": 0.8, "of_class": 0.5}
    assert "80 % of its images in the class, on 50 % of the class" in client.get(f"/saes/{key}/classes").text


def test_the_coverage_is_read_once_per_version_of_the_sae(web, monkeypatch):
    """Reading every live feature's classes takes ~0.5 s at 49,152 features: the pages and the API share one
    reading per version of the SAE row, and a new precompute (which moves ``updated_at``) is read again."""
    import backend.routes.api as api

    client, key = web
    reads = []
    monkeypatch.setattr(api, "class_coverage", lambda session, sae: reads.append(sae.updated_at) or class_coverage(session, sae))
    client.app.state.diagnostics.clear()
    first = client.get(f"/api/saes/{key}/classes").json()
    assert client.get(f"/saes/{key}/classes").status_code == 200 and client.get(f"/api/saes/{key}/classes").json() == first
    assert len(reads) == 1
    rows, _ = _live(client, key)
    idx = next(idx for idx, name, _ in rows if name)
    with session_scope(client.app.state.database_url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        f = s.scalar(select(Feature).where(Feature.sae_id == sae.id, Feature.idx == idx))
        f.top_class, f.classes = "okapi", [{"label": 98, "name": "okapi", "count": 1, "share": 1.0, "of_class": 1.0, "mean": 1.0}]
        sae.name = sae.name + " "
    again = client.get(f"/api/saes/{key}/classes").json()
    assert len(reads) == 2 and reads[1] != reads[0]
    assert {"name": "okapi", "features": 1, "best": {"index": idx, "share": 1.0, "of_class": 1.0}} in again["classes"]
