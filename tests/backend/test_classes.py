"""Which classes of the precompute set an SAE's live features lead (``/saes/{sae}/classes`` and its API), and the
list's exact-name search ("..." in double quotes) its links use."""

import re
from urllib.parse import unquote

from sqlalchemy import select

from clipscope.db.models import Feature, Sae
from clipscope.db.session import session_scope


def _live(client, key):
    with session_scope(client.app.state.database_url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        rows = s.execute(select(Feature.idx, Feature.top_class, Feature.top_class_share).where(Feature.sae_id == sae.id, Feature.is_dead.is_(False))).all()
        return rows, list(sae.precompute["classes"])


def _total(client, key, **params):
    return int(re.search(r"<h1>Features <span class=\"muted small\">(\d+) of", client.get(f"/saes/{key}/features", params=params).text).group(1))


def test_each_class_leads_the_features_whose_leading_class_it_is(web):
    client, key = web
    rows, classes = _live(client, key)
    got = client.get(f"/api/saes/{key}/classes").json()
    assert got["n_classes"] == len(classes) and got["live"] == len(rows)
    for entry in got["classes"]:
        mine = [(idx, share) for idx, name, share in rows if name == entry["name"]]
        assert entry["features"] == len(mine) and (entry["best_share"], entry["purest"]) == max(((s, i) for i, s in mine), key=lambda p: (p[0], -p[1]))
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
