"""The overview over several SAEs (``two_saes``, tests/conftest.py): each SAE's point on the
sparsity-fidelity charts, read from its own metrics and evaluations."""

import re

import pytest
from fastapi.testclient import TestClient

from backend.services.saes import frontier


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
    saes = [{"key": "a", "metrics": {"l0": 8.0, "evr": 0.9}, "drops": {"cifar10/test": 1.5, "cifar100/test": None}},
            {"key": "b", "metrics": {"l0": 32.0, "evr": 0.95}, "drops": {"cifar100/test": 4.0}},
            {"key": "c", "metrics": {}, "drops": {"cifar10/test": 2.0}}]
    got = frontier(saes)
    assert got["evr"] == {"held-out EVR": [(8.0, 0.9, "a", "#sae-a"), (32.0, 0.95, "b", "#sae-b")]}
    assert got["drops"] == {"cifar10/test": [(8.0, 1.5, "a", "#sae-a")], "cifar100/test": [(32.0, 4.0, "b", "#sae-b")]}
