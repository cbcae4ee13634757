"""The features that fire with a feature, on its page (loaded after it) and in the API."""

import numpy as np
import torch
from fastapi.testclient import TestClient

from tests.backend.conftest import private_app


def test_partners_are_those_of_the_sae_s_firing_over_its_precompute_cache(web, web_data):
    from clipscope.activation_cache import ActivationCache
    from clipscope.sae.io import load_sae
    from clipscope.token_maps import per_image_entries

    client, key = web
    settings = web_data[0]
    cache_name = client.get(f"/api/saes/{key}").json()["precompute"]["cache"]
    cache = ActivationCache.open(settings.data_dir / "activations" / cache_name)
    sae = load_sae(settings.data_dir / "saes" / key / "sae")[0]
    with torch.no_grad():
        code = sae.encode(torch.from_numpy(np.asarray(cache.activations(), dtype=np.float32)).reshape(-1, cache.d))
    img, feat, _ = per_image_entries(code.indices, code.values, torch.arange(cache.n_images), 1, 64)
    fires = np.zeros((cache.n_images, 64), dtype=bool)
    fires[img.numpy(), feat.numpy()] = True
    f = int(np.argmax(fires.sum(0)))  # the feature firing most often: it has partners
    body = client.get(f"/api/saes/{key}/features/{f}/cofiring", params={"k": 5}).json()
    assert body["n_images"] == cache.n_images and body["fires_on"] == fires[:, f].sum()
    together = (fires & fires[:, f][:, None]).sum(0)
    jaccard = together / (fires[:, f].sum() + fires.sum(0) - together)
    jaccard[f] = -1
    best = [g for g in sorted(range(64), key=lambda g: (-jaccard[g], -together[g], g))[:5] if together[g] > 0]
    assert [p["index"] for p in body["partners"]] == best and all(p["together"] == together[p["index"]] for p in body["partners"])
    assert all("label" in p and "examples" in p for p in body["partners"])
    assert client.get(f"/api/saes/{key}/features/64/cofiring").status_code == 404
    page = client.get(f"/saes/{key}/features/{f}").text
    assert f'hx-get="/saes/{key}/features/{f}/cofiring"' in page
    fragment = client.get(f"/saes/{key}/features/{f}/cofiring").text
    assert "Fires together with" in fragment and f'href="/saes/{key}/features/{best[0]}"' in fragment


def test_without_the_activation_cache_the_section_says_what_to_copy(web_data, tmp_path):
    settings, key = web_data
    data = tmp_path / "data"
    (data / "saes").mkdir(parents=True)
    (data / "saes" / key).symlink_to(settings.data_dir / "saes" / key)
    with TestClient(private_app(web_data, tmp_path, data_dir=data)) as client:
        r = client.get(f"/api/saes/{key}/features/3/cofiring")
        assert r.status_code == 503 and "activation cache is not on this server" in r.json()["detail"] and "activations/" in r.json()["detail"]
        fragment = client.get(f"/saes/{key}/features/3/cofiring")
        assert fragment.status_code == 200 and "activation cache is not on this server" in fragment.text


def test_the_table_is_encoded_with_the_sae_the_analysis_keeps(web_data, tmp_path, monkeypatch):
    """The weights are read once for co-firing and the pages that encode with the analysis' SAE (an image of
    the set): one copy in memory, not one per feature of the explorer."""
    import clipscope.sae.io as sae_io

    reads = []
    real = sae_io.load_file
    monkeypatch.setattr(sae_io, "load_file", lambda path, *a, **kw: reads.append(path) or real(path, *a, **kw))
    settings, key = web_data
    with TestClient(private_app(web_data, tmp_path)) as client:
        busiest = client.get(f"/api/saes/{key}/features", params={"sort": "frequency", "order": "desc", "per_page": 1}).json()["features"][0]
        assert client.get(f"/api/saes/{key}/features/{busiest['index']}/cofiring").json()["partners"]
        image = busiest["examples"][0]["image_id"]
        assert client.get(f"/api/saes/{key}/images/{image}").json()["ranked"] is not None
    assert len([r for r in reads if key in str(r)]) == 1, reads
