"""A feature's closest features in the other SAEs at the same hook site, on the feature page and in the API."""

import re

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from clipscope.db.models import Sae, SaeStatus
from clipscope.db.session import session_scope
from clipscope.sae.io import load_sae, save_sae
from tests.backend.conftest import private_app


def _other(key: str, d_sae: int, layer: int = 10, pretrained: str = "none") -> Sae:
    return Sae(key=key, name=key, status=SaeStatus.READY, model="ViT-B-32", pretrained=pretrained, random_weights=True, layer=layer,
               tokens="cls", d_in=768, d_sae=d_sae, k=8, recipe="topk", config={}, provenance={}, metrics={})


@pytest.fixture
def site(web_data, tmp_path):
    """The web SAE beside four others: ``perm`` (its atoms permuted and rescaled, plus random ones), one
    at another block, one of other CLIP weights, and ``gone`` whose files this server lacks."""
    settings, key = web_data
    data = tmp_path / "data"
    (data / "saes").mkdir(parents=True)
    (data / "saes" / key).symlink_to(settings.data_dir / "saes" / key)
    (data / "thumbnails").symlink_to(settings.data_dir / "thumbnails")
    app = private_app(web_data, tmp_path, data_dir=data)
    sae, meta = load_sae(settings.data_dir / "saes" / key / "sae")
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    perm = type(sae)(768, 96, 8)
    with torch.no_grad():
        perm.W_dec[:64] = sae.W_dec[order] * 2.5
        perm.W_dec[64:] = torch.randn(32, 768, generator=torch.Generator().manual_seed(1))
    for name, weights in (("perm", perm), ("block-9", perm), ("laion", perm)):
        save_sae(weights, data / "saes" / name / "sae", meta)
    with session_scope(app.state.database_url) as s:
        s.add_all([_other("perm", 96), _other("block-9", 96, layer=9), _other("laion", 96, pretrained="laion2b_s34b_b79k"), _other("gone", 64)])
    with TestClient(app) as client:
        yield client, key, data, sae, perm, order


def _brute_force(sae, other, idx: int, k: int = 3) -> list[tuple[int, float]]:
    cos = torch.nn.functional.cosine_similarity(other.W_dec.detach(), sae.W_dec.detach()[idx][None], dim=1)
    return list(zip(cos.argsort(descending=True)[:k].tolist(), cos.sort(descending=True).values[:k].tolist()))


def test_each_other_sae_at_the_site_gives_its_closest_atoms(site):
    client, key, _, sae, perm, order = site
    client.post("/api/saes/perm/features/%d/labels" % int((order == 5).nonzero()), json={"text": "the twin", "category": "visual", "author": "ann"})
    body = client.get(f"/api/saes/{key}/features/5/matches").json()
    assert [m["sae"] for m in body["matches"]] == ["gone", "perm"], "same model, weights and block only; newest first"
    gone, twin = body["matches"]
    assert gone["features"] == [] and "is not an SAE folder" in gone["unavailable"]
    assert twin["unavailable"] is None and twin["d_sae"] == 96 and twin["chance"] == pytest.approx(0.109, abs=1e-3)
    found = [(f["index"], f["cosine"]) for f in twin["features"]]
    assert found[0][0] == int((order == 5).nonzero()) and found[0][1] == pytest.approx(1.0, abs=1e-5), "its own atom, permuted and rescaled"
    assert [f for f, _ in found] == [f for f, _ in _brute_force(sae, perm, 5)]
    assert [c for _, c in found] == pytest.approx([c for _, c in _brute_force(sae, perm, 5)], abs=1e-5)
    assert twin["features"][0]["label"]["text"] == "the twin"
    assert len(client.get(f"/api/saes/{key}/features/5/matches", params={"k": 7}).json()["matches"][1]["features"]) == 7
    assert client.get(f"/api/saes/{key}/features/64/matches").status_code == 404
    assert client.get(f"/api/saes/{key}/features/5/matches", params={"k": 0}).status_code == 422


def test_the_feature_page_loads_the_matches_after_it(site):
    client, key, _, _, _, order = site
    page = client.get(f"/saes/{key}/features/5").text
    assert f'hx-get="/saes/{key}/features/5/matches" hx-trigger="load"' in page
    fragment = client.get(f"/saes/{key}/features/5/matches").text
    assert "In other SAEs at this site" in fragment and "is not an SAE folder" in fragment
    first = re.search(r'<a href="/saes/perm/features/(\d+)">', fragment)
    assert first and int(first.group(1)) == int((order == 5).nonzero())
    assert "block-9" not in fragment and "laion" not in fragment
    assert "use its label" not in fragment, "no match is labelled yet"
    twin = int((order == 5).nonzero())
    client.post(f"/api/saes/perm/features/{twin}/labels", json={"text": 'berries "on" cream', "category": "semantic", "author": "ann"})
    fragment = client.get(f"/saes/{key}/features/5/matches").text
    assert fragment.count("use its label") == 1
    assert 'data-fill-label="berries &#34;on&#34; cream" data-fill-category="semantic"' in fragment, "the label's text and category, escaped"


def test_a_retrained_sae_s_atoms_are_read_again(site):
    client, key, data, sae, perm, _ = site
    client.get(f"/api/saes/{key}/features/5/matches")  # atoms kept
    with torch.no_grad():
        perm.W_dec[70] = sae.W_dec[5] * -1  # now the opposite of feature 5: its worst match
        perm.W_dec[71] = sae.W_dec[5] + 1e-3 * torch.randn(768, generator=torch.Generator().manual_seed(2))
    save_sae(perm, data / "saes" / "perm" / "sae", {})
    with session_scope(client.app.state.database_url) as s:
        s.scalar(select(Sae).where(Sae.key == "perm")).name = "perm, retrained"  # any change moves updated_at
    twin = client.get(f"/api/saes/{key}/features/5/matches").json()["matches"][1]
    assert twin["name"] == "perm, retrained" and 71 in [f["index"] for f in twin["features"][:2]]


def test_with_no_other_sae_at_the_site_the_section_is_empty(web):
    client, key = web
    assert client.get(f"/api/saes/{key}/features/5/matches").json() == {"matches": []}
    assert "In other SAEs" not in client.get(f"/saes/{key}/features/5/matches").text
