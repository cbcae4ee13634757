"""The explorer over several SAEs at one hook site (``two_saes``, tests/conftest.py): each SAE's point on the
overview's sparsity-fidelity charts, and one SAE's features ranked by their best match in the other."""

import csv
import io
import re

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from backend.services.saes import frontier
from clipscope.db.models import Feature, Sae, SaeOverlap
from clipscope.db.session import session_scope
from clipscope.matching import unit_atoms
from clipscope.overlap_rows import best_bytes, best_of
from clipscope.sae.io import load_sae
from tests.conftest import copy_data_dir


@pytest.fixture(scope="module")
def overview(two_saes):
    from backend.app import create_app

    settings, keys = two_saes
    with TestClient(create_app(settings)) as client:
        yield client.get("/").text, {k: client.get(f"/api/saes/{k}").json() for k in keys}


def test_each_sae_is_a_point_of_both_charts_leading_to_its_card(overview):
    page, saes = overview
    charts = re.findall(r'<svg class="chart scatter".*?</svg>', page, flags=re.S)
    assert len(charts) == 2 and "Reconstruction and zero-shot cost against sparsity" in page
    for key, sae in saes.items():
        evr, drop = sae["metrics"]["evr"], sae["evaluations"][0]["drop_pp"]
        assert f'<a href="#sae-{key}"><circle' in charts[0] and f"<title>{key}: held-out EVR {evr:.4g}, L0 {sae['metrics']['l0']:g}</title>" in charts[0]
        assert f"<title>{key}: zero-shot drop (pp) {drop:.4g}, L0" in charts[1]
        assert f'id="sae-{key}"' in page


def test_the_frontier_leaves_out_an_sae_without_an_l0_and_an_unmeasured_drop():
    sample = {"n": 40, "shares": [{"category": "visual", "share": 0.5, "low": 0.35, "high": 0.65},
                                  {"category": "semantic", "share": 0.25, "low": 0.14, "high": 0.4}]}
    saes = [{"key": "a", "metrics": {"l0": 8.0, "evr": 0.9}, "drops": {"cifar10/test": 1.5, "cifar100/test": None},
             "recovered": {"cifar10/test": 0.8, "cifar100/test": None}, "labels": {"sample": sample}},
            {"key": "b", "metrics": {"l0": 32.0, "evr": 0.95}, "drops": {"cifar100/test": 4.0}, "recovered": {"cifar100/test": 0.7},
             "labels": {"sample": {"n": 0, "shares": []}}},
            {"key": "c", "metrics": {}, "drops": {"cifar10/test": 2.0}, "recovered": {"cifar10/test": 0.9}, "labels": None}]
    got = frontier(saes)
    assert got["semantic"] == {"semantic share": [(8.0, 0.25, "a (n = 40)", "#sae-a", (0.14, 0.4))]}, "only a labelled sample has a point"
    assert got["evr"] == {"held-out EVR": [(8.0, 0.9, "a", "#sae-a"), (32.0, 0.95, "b", "#sae-b")]}
    assert got["drops"] == {"cifar10/test": [(8.0, 1.5, "a", "#sae-a")], "cifar100/test": [(32.0, 4.0, "b", "#sae-b")]}
    assert got["recovered"] == {"cifar10/test": [(8.0, 0.8, "a", "#sae-a")], "cifar100/test": [(32.0, 0.7, "b", "#sae-b")]}


def _best_in(settings, a, b) -> dict[int, float]:
    """Each live feature of ``a``: its largest cosine to a live atom of ``b``, computed here from the files."""
    atoms, live = {}, {}
    with session_scope(settings.resolved_database_url) as s:
        for key in (a, b):
            sae_id = s.scalar(select(Sae.id).where(Sae.key == key))
            live[key] = s.scalars(select(Feature.idx).where(Feature.sae_id == sae_id, Feature.n_active > 0).order_by(Feature.idx)).all()
            atoms[key] = unit_atoms(load_sae(settings.data_dir / "saes" / key / "sae")[0].W_dec)[live[key]]
    best = (atoms[a] @ atoms[b].T).amax(1)
    return dict(zip(live[a], best.tolist()))


@pytest.fixture
def private(two_saes, tmp_path):
    from backend.app import create_app

    settings, keys = two_saes
    url = copy_data_dir(settings.data_dir, tmp_path / "data")
    private = settings.model_copy(update={"data_dir": tmp_path / "data", "database_url": url})
    with TestClient(create_app(private)) as client:
        yield client, private, keys


def test_the_list_ranks_one_sae_s_features_by_their_best_match_in_the_other(private):
    client, settings, (a, b) = private
    expected = _best_in(settings, a, b)
    got = client.get(f"/api/saes/{a}/features", params={"matched_in": b, "per_page": 500}).json()
    assert got["total"] == len(expected), "every live feature, no dead one"
    cos = [r["match_cosine"] for r in got["features"]]
    assert cos == sorted(cos), "lowest first: the features b lacks"
    assert all(abs(r["match_cosine"] - expected[r["index"]]) < 2e-3 for r in got["features"]), "stored as float16"
    desc = client.get(f"/api/saes/{a}/features", params={"matched_in": b, "order": "desc", "per_page": 500}).json()["features"]
    assert [r["match_cosine"] for r in desc] == sorted(cos, reverse=True)
    table = list(csv.DictReader(io.StringIO(client.get(f"/api/saes/{a}/features.csv", params={"matched_in": b}).text)))
    assert [int(r["index"]) for r in table] == [r["index"] for r in got["features"]] and "match_cosine" in table[0]

    page = client.get(f"/saes/{a}/features", params={"matched_in": b}).text
    assert f'<option selected>{b}</option>' in page and "lowest first: the features it lacks" in page
    assert page.count(f"best cosine in {b} ") == min(50, len(expected))


def test_a_pair_not_measured_or_two_rankings_at_once_are_refused_and_the_page_says_why(private):
    client, _, (a, b) = private
    answer = client.get(f"/api/saes/{a}/features", params={"matched_in": "nope"})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["query", "matched_in"]
    assert f"No SAE 'nope' at this SAE's hook site has its shared features measured with it; those that have: {b}." == answer.json()["detail"][0]["msg"]
    both = client.get(f"/api/saes/{a}/features", params={"matched_in": b, "concept": "stripes"})
    assert both.status_code == 422 and "concept and matched_in both rank the list" in both.json()["detail"][0]["msg"]
    page = client.get(f"/saes/{a}/features", params={"matched_in": "nope"})
    assert page.status_code == 200 and "No SAE &#39;nope&#39; at this SAE&#39;s hook site" in page.text and "best cosine in" not in page.text


def test_a_pair_measured_again_reorders_the_kept_list(private):
    client, settings, (a, b) = private
    first = [r["index"] for r in client.get(f"/api/saes/{a}/features", params={"matched_in": b, "per_page": 500}).json()["features"]]
    with session_scope(settings.resolved_database_url) as s:  # as if b's precompute changed and the pair was measured again
        ids = dict(s.execute(select(Sae.key, Sae.id)).all())
        row = s.scalar(select(SaeOverlap).where(SaeOverlap.sae_id == ids[a], SaeOverlap.other_id == ids[b]))
        best = best_of(row.best)
        live = np.flatnonzero(~np.isnan(best))
        row.best = best_bytes(torch.from_numpy(1 - best[live]), live, len(best))
        row.versions = {**row.versions, "other": "again"}
        other = s.get(Sae, ids[b])
        other.precompute = {**other.precompute, "key": "again"}
    again = [r["index"] for r in client.get(f"/api/saes/{a}/features", params={"matched_in": b, "per_page": 500}).json()["features"]]
    assert sorted(again) == sorted(first) and again != first, "the same server, the new cosines' ordering"


def test_the_side_by_side_table_compares_what_each_sae_s_random_sample_estimates(private):
    from backend.services.label_sample import sample_order, wilson

    client, _, (a, b) = private
    alive = {r["index"] for r in client.get(f"/api/saes/{a}/features", params={"dead": "hide", "per_page": 500}).json()["features"]}
    first = [int(f) for f in sample_order(a, 64) if int(f) in alive][:3]
    for idx, category in zip(first, ("semantic", "semantic", "noise")):
        assert client.post(f"/api/saes/{a}/features/{idx}/labels", json={"text": "x", "category": category, "author": "ann"}).status_code == 201
    table = client.get("/").text.split('<section class="card compare">')[1].split("</table>")[0]
    cells = dict(re.findall(r'<a href="#sae-([^"]+)">.*?<td class="semantic-share">(.*?)</td>', table, flags=re.S))
    low, high = wilson(2, 3)
    assert cells[a] == f'67 % <span class="small muted">({100 * low:.0f} %–{100 * high:.0f} %, n = 3)</span>'
    assert cells[b] == "–", "nothing labelled in b's sample"
    (chart,) = [c for c in re.findall(r'<svg class="chart scatter".*?</svg>', client.get("/").text, flags=re.S) if "semantic share" in c]
    assert f'<a href="#sae-{a}"><circle' in chart and f'href="#sae-{b}"' not in chart and chart.count('class="interval"') == 1
