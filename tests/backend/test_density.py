"""The overview's feature-density histogram (and the API's ``density``), against the feature rows."""

import numpy as np
import pytest
from sqlalchemy import select, update

from clipscope.db.models import Feature, Sae
from clipscope.db.session import session_scope


def test_the_density_counts_every_feature_once_by_its_firing_frequency(web):
    client, key = web
    density = client.get(f"/api/saes/{key}").json()["density"]
    features = client.get(f"/api/saes/{key}/features", params={"per_page": 200}).json()["features"]
    freqs = np.array([f["frequency"] for f in features])
    n = density["n_images"]
    assert density["n_features"] == len(features) == 64 and density["edges"][0] == 1 / n and density["edges"][-1] == 1.0
    assert sum(density["counts"]) + density["dead"] == 64, "every feature in one bin, or dead"
    assert density["dead"] == int((freqs == 0).sum()) == sum(f["is_dead"] for f in features)
    expected = [int(((freqs >= lo) & ((freqs < hi) if i < len(density["counts"]) - 1 else (freqs <= hi))).sum())
                for i, (lo, hi) in enumerate(zip(density["edges"], density["edges"][1:]))]
    assert density["counts"] == expected
    assert density["dense"] == sum(f["is_dense"] for f in features) and density["dense_threshold"] == pytest.approx(0.1)
    assert density["median_live"] == pytest.approx(float(np.median(freqs[freqs > 0])))


def test_the_overview_shows_it_and_follows_a_new_precompute(web):
    client, key = web
    page = client.get("/").text
    density = client.get(f"/api/saes/{key}").json()["density"]
    assert "Feature density" in page and f'<span class="dead-count">{density["dead"]}</span> never fire' in page
    assert 'aria-label="feature density' in page and f">+ {density['dead']} never fire, not drawn</text>" in page and density["dead"] > 0
    live = [f["index"] for f in client.get(f"/api/saes/{key}/features", params={"per_page": 200, "dead": "hide"}).json()["features"]][:3]
    with session_scope(client.app.state.database_url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        s.execute(update(Feature).where(Feature.sae_id == sae.id, Feature.idx.in_(live)).values(frequency=0.0))
        sae.name = sae.name + " "  # as a precompute does, the row's update moves updated_at
    again = client.get(f"/api/saes/{key}").json()["density"]
    assert len(live) == 3 and again["dead"] == density["dead"] + 3 and sum(again["counts"]) == sum(density["counts"]) - 3


def test_the_redundancy_is_each_live_atom_s_cosine_to_its_nearest_other_atom(web, web_data):
    import math

    import torch

    from clipscope.sae.io import load_sae

    client, key = web
    redundancy = client.get(f"/api/saes/{key}").json()["redundancy"]
    features = client.get(f"/api/saes/{key}/features", params={"per_page": 500}).json()["features"]
    alive = [f["index"] for f in features if not f["is_dead"]]
    w = torch.nn.functional.normalize(load_sae(web_data[0].data_dir / "saes" / key / "sae")[0].W_dec.detach().double(), dim=1)
    cos = w @ w.T
    cos.fill_diagonal_(-math.inf)
    nearest = np.round(cos.max(1).values.numpy()[alive], 6)  # stored to 6 decimals
    assert redundancy["n_features"] == len(alive) and sum(redundancy["counts"]) + redundancy["below"] == len(alive)
    assert redundancy["counts"] == np.histogram(nearest, np.linspace(0, 1, 21))[0].tolist() and redundancy["below"] == int((nearest < 0).sum())
    assert redundancy["median"] == pytest.approx(float(np.median(nearest)), abs=1e-6)
    assert redundancy["near_duplicates"] == int((nearest > 0.9).sum())
    assert redundancy["chance"] == pytest.approx(math.sqrt(2 * math.log(64) / 768))
    assert "Dictionary redundancy" in client.get("/").text
