"""Labelling in the SAE's fixed random order, and what the labelled start of that order estimates."""

import numpy as np
import pytest
from sqlalchemy import select

from backend.services.label_sample import Z_95, sample_order, sample_rank, wilson
from backend.services.labels import save_label
from clipscope.db.models import Feature, Sae
from clipscope.db.session import session_scope


def test_the_sample_order_is_one_fixed_permutation_per_sae():
    order = sample_order("web-abc", 1000)
    assert sorted(order.tolist()) == list(range(1000)) and order.tolist() != list(range(1000))
    assert np.array_equal(order, sample_order("web-abc", 1000)), "the same for every process and labeller"
    assert not np.array_equal(order, sample_order("web-abd", 1000))
    assert np.array_equal(sample_rank("web-abc", 1000)[order], np.arange(1000))


@pytest.mark.parametrize("count, n", [(2, 3), (0, 10), (10, 10), (7, 40), (1, 1)])
def test_wilson_intervals_are_the_roots_of_the_score_test(count, n):
    """The interval's ends are the p where the score statistic (p_hat - p)^2 / (p (1 - p) / n) equals z^2."""
    p_hat, z2 = count / n, Z_95**2
    roots = sorted(np.roots([1 + z2 / n, -(2 * p_hat + z2 / n), p_hat**2]).real)
    assert wilson(count, n) == pytest.approx((max(0.0, roots[0]), min(1.0, roots[1])), abs=1e-12)
    assert wilson(0, 0) == (0.0, 1.0)


def _alive(client, key) -> list[int]:
    rows = client.get(f"/api/saes/{key}/features", params={"per_page": 500, "dead": "hide"}).json()["features"]
    return [r["index"] for r in rows]


def _label(client, key, idx, category, author="ann"):
    assert client.post(f"/api/saes/{key}/features/{idx}/labels", json={"text": f"feature {idx}", "category": category, "author": author}).status_code == 201


def test_the_list_sorts_by_the_sample_order(web):
    client, key = web
    listed = lambda **p: [r["index"] for r in client.get(f"/api/saes/{key}/features", params={"sort": "sample", "per_page": 500, **p}).json()["features"]]  # noqa: E731
    order = sample_order(key, 64).tolist()
    assert listed() == order and listed(order="desc") == order[::-1]
    alive = set(_alive(client, key))
    assert listed(dead="hide") == [f for f in order if f in alive]
    assert "sample" in client.get(f"/saes/{key}/features", params={"sort": "sample"}).text


def test_the_labelled_start_of_the_sample_estimates_each_category(web):
    client, key = web
    alive = set(_alive(client, key))
    order = [f for f in sample_order(key, 64).tolist() if f in alive]
    dead = sorted(set(range(64)) - alive)
    for idx, category in zip(order[:3], ("semantic", "semantic", "noise")):
        _label(client, key, idx, category)
    _label(client, key, order[4], "visual")  # beyond a gap: not part of the sample yet
    if dead:
        _label(client, key, dead[0], "unclear")  # dead features are no part of it
    summary = client.get(f"/api/saes/{key}/labels/summary").json()
    assert summary["labelled"] == 4 + bool(dead)
    assert summary["categories"] == {"semantic": 2, "visual": 1, "noise": 1, "unclear": int(bool(dead))}
    sample = summary["sample"]
    assert (sample["alive"], sample["n"], sample["next"]) == (len(order), 3, order[3])
    shares = {s["category"]: s for s in sample["shares"]}
    assert shares["semantic"]["count"] == 2 and shares["semantic"]["share"] == pytest.approx(2 / 3)
    assert (shares["semantic"]["low"], shares["semantic"]["high"]) == pytest.approx(wilson(2, 3))
    assert shares["visual"]["count"] == 0 and shares["unclear"]["count"] == 0
    answer = client.get(f"/saes/{key}/features/next-to-label", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == f"/saes/{key}/features/{order[3]}"
    overview = client.get("/").text
    assert "The first 3 live features of the random sample order are all labelled" in overview and f"(#{order[3]})" in overview

    with session_scope(client.app.state.database_url) as s:  # another process (an import) labels the gap
        save_label(s, s.scalar(select(Sae).where(Sae.key == key)), order[3], "from an import", "unclear", "bob", 0)
    sample = client.get(f"/api/saes/{key}/labels/summary").json()["sample"]
    assert (sample["n"], sample["next"]) == (5, order[5]), "the gap filled, the label beyond it counts too"


def test_with_every_live_feature_labelled_the_next_is_the_overview(web):
    client, key = web
    for idx in _alive(client, key):
        _label(client, key, idx, "visual")
    sample = client.get(f"/api/saes/{key}/labels/summary").json()["sample"]
    assert sample["n"] == sample["alive"] and sample["next"] is None
    assert {s["category"]: s["share"] for s in sample["shares"]}["visual"] == 1.0
    assert client.get(f"/saes/{key}/features/next-to-label", follow_redirects=False).headers["location"] == f"/#sae-{key}"
    assert "Every live feature is labelled." in client.get("/").text


def test_a_new_precompute_s_live_features_are_read_again(web):
    client, key = web
    before = client.get(f"/api/saes/{key}/labels/summary").json()["sample"]["alive"]
    with session_scope(client.app.state.database_url) as s:  # what a new precompute does: new flags, a new row version
        row = s.scalar(select(Sae).where(Sae.key == key))
        s.scalar(select(Feature).where(Feature.sae_id == row.id, Feature.is_dead.is_(False)).limit(1)).is_dead = True
        row.name = row.name + " (again)"
    assert client.get(f"/api/saes/{key}/labels/summary").json()["sample"]["alive"] == before - 1


def test_the_sample_s_categories_per_labeller_show_once_there_are_two(web):
    import re

    client, key = web
    alive = set(_alive(client, key))
    order = [f for f in sample_order(key, 64).tolist() if f in alive]
    _label(client, key, order[0], "semantic")
    by = client.get(f"/api/saes/{key}/labels/summary").json()["sample"]["by_author"]
    assert [(a["author"], a["n"]) for a in by] == [("ann", 1)] and "label-authors" not in client.get("/").text, "one labeller: no table"
    for idx, category, author in zip(order[1:5], ("semantic", "noise", "noise", "visual"), ("bob", "bob", "bob", "ann")):
        _label(client, key, idx, category, author)
    _label(client, key, order[6], "semantic", "cy")  # beyond the sample's labelled start: not counted
    by = client.get(f"/api/saes/{key}/labels/summary").json()["sample"]["by_author"]
    assert [(a["author"], a["n"]) for a in by] == [("bob", 3), ("ann", 2)]
    bob = by[0]["categories"]
    assert (bob["semantic"]["count"], bob["noise"]["count"], bob["visual"]["count"]) == (1, 2, 0)
    assert bob["noise"]["share"] == pytest.approx(2 / 3) and by[1]["categories"]["visual"]["share"] == 0.5
    table = re.search(r'<table class="evals label-authors">.*?</table>', client.get("/").text, re.S).group(0)
    cells = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr><td>.*?</tr>", table)]
    assert cells == [["bob", "3", "33 %", "0 %", "67 %", "0 %"], ["ann", "2", "50 %", "50 %", "0 %", "0 %"]]
