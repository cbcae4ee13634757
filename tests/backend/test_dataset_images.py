"""An image of the precompute set: every feature it fires (from the activation cache) and where it is an example."""

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import delete, select

from clipscope.activation_cache import ActivationCache
from clipscope.db.models import FeatureExample, Image, Sae
from clipscope.db.session import session_scope
from clipscope.sae.io import load_sae
from tests.backend.conftest import private_app


def _sae_row(client, key) -> Sae:
    with session_scope(client.app.state.database_url) as s:
        row = s.scalar(select(Sae).where(Sae.key == key))
        s.expunge(row)
        return row


def _busiest_example(client, key) -> tuple[int, dict]:
    """A feature with top images, and its first one."""
    feats = client.get(f"/api/saes/{key}/features", params={"sort": "frequency", "order": "desc", "per_page": 1}).json()["features"]
    idx = feats[0]["index"]
    return idx, client.get(f"/api/saes/{key}/features/{idx}").json()["top"][0]


def _encoded(settings, sae_row: Sae, image: Image) -> dict[int, float]:
    """The SAE's code of the image's cached inputs, by hand: ``{feature: max over tokens}``."""
    sae, _ = load_sae(settings.data_dir / "saes" / sae_row.key / "sae")
    cache = ActivationCache.open(settings.data_dir / "activations" / sae_row.precompute["cache"])
    row = int(np.flatnonzero(np.asarray(cache.indices()) == image.index)[0])
    x = torch.from_numpy(np.asarray(cache.activations()[row], dtype=np.float32)).reshape(-1, cache.d)
    with torch.no_grad():
        dense = sae.encode(x).to_dense().amax(0)
    return {int(f): float(dense[f]) for f in torch.nonzero(dense > 0).flatten()}


def test_an_image_lists_every_feature_it_fires_with_the_precompute_s_activations(web, web_data):
    client, key = web
    idx, top = _busiest_example(client, key)
    body = client.get(f"/api/saes/{key}/images/{top['image_id']}").json()
    assert body["image"]["id"] == top["image_id"] and body["image"]["thumbnail"] == top["thumbnail"]
    ranked = body["ranked"]
    by_act = {e["index"]: e["activation"] for e in ranked["by_activation"]}
    assert by_act[idx] == pytest.approx(top["activation"], rel=1e-5), "the precompute's own activation"
    with session_scope(client.app.state.database_url) as s:
        image = s.get(Image, top["image_id"])
        s.expunge(image)
        stored = {(r.feature, r.bucket, r.rank) for r in s.execute(select(FeatureExample).where(FeatureExample.image_id == image.id)).scalars()}
    truth = _encoded(web_data[0], _sae_row(client, key), image)
    assert ranked["n_active"] == len(truth) and by_act.keys() == truth.keys()
    assert [by_act[f] for f in truth] == pytest.approx(list(truth.values()), rel=1e-5)
    assert [e["activation"] for e in ranked["by_activation"]] == sorted(by_act.values(), reverse=True)
    rel = [e["relative"] for e in ranked["by_relative"]]
    assert rel == sorted(rel, reverse=True) and all(e["relative"] == pytest.approx(e["activation"] / e["max_activation"]) for e in ranked["by_relative"])
    assert {(a["index"], a["bucket"], a["rank"]) for a in body["examples_of"]} == stored
    assert (idx, -1, 0) in stored and body["examples_of"][0]["bucket"] == -1, "top images first"
    page = client.get(f"/saes/{key}/images/{top['image_id']}").text
    assert f'href="/saes/{key}/features/{idx}"' in page and "top image 1" in page and f"{len(truth)} features of SAE" in page
    assert f'href="/saes/{key}/images/{top["image_id"]}"' in client.get(f"/saes/{key}/features/{idx}").text, "the feature page links its images"


def test_an_image_not_of_the_set_is_a_404_with_the_reason(web):
    client, key = web
    with session_scope(client.app.state.database_url) as s:
        known = s.scalar(select(Image).limit(1))
        elsewhere = Image(dataset="cifar10", split="test", dataset_key="another", index=known.index, label=0, class_name="cat",
                          content_hash="0" * 64, width=32, height=32, thumbnail=known.thumbnail)
        beyond = Image(dataset=known.dataset, split=known.split, dataset_key=known.dataset_key, index=10_000, label=0, class_name="x",
                       content_hash="1" * 64, width=32, height=32, thumbnail=known.thumbnail)
        s.add_all([elsewhere, beyond])
        s.flush()
        ids = elsewhere.id, beyond.id
    for image_id in ids:
        answer = client.get(f"/api/saes/{key}/images/{image_id}")
        assert answer.status_code == 404 and "is not in the image set SAE" in answer.json()["detail"]
        assert client.get(f"/saes/{key}/images/{image_id}").status_code == 404
    assert client.get(f"/api/saes/{key}/images/999999").json()["detail"] == "There is no image 999999."
    assert client.get(f"/api/saes/{key}/images/{2**40}").status_code == 422, "beyond the database's integers: refused, not a 500"


def test_an_image_of_the_set_no_feature_shows_is_found_by_its_dataset(web, web_data):
    """Any image of the precompute set has a page; before precomputes recorded their image set, only their examples."""
    client, key = web
    sae_row = _sae_row(client, key)
    with session_scope(client.app.state.database_url) as s:
        image = s.scalar(select(Image).limit(1))
        s.execute(delete(FeatureExample).where(FeatureExample.image_id == image.id))  # now no feature shows it
        s.expunge(image)
    body = client.get(f"/api/saes/{key}/images/{image.id}").json()
    truth = _encoded(web_data[0], sae_row, image)
    assert body["examples_of"] == [] and {e["index"] for e in body["ranked"]["by_activation"]} == truth.keys()
    assert "None of this SAE's features shows it" in client.get(f"/saes/{key}/images/{image.id}").text
    with session_scope(client.app.state.database_url) as s:
        row = s.scalar(select(Sae).where(Sae.key == key))
        row.precompute = {k: v for k, v in row.precompute.items() if k != "images"}
    assert client.get(f"/api/saes/{key}/images/{image.id}").status_code == 404
    _, top = _busiest_example(client, key)
    assert client.get(f"/api/saes/{key}/images/{top['image_id']}").json()["ranked"]["n_active"] > 0, "an example is known as one"


def test_without_the_cache_the_image_still_shows_where_it_is_an_example(web_data, tmp_path):
    settings, key = web_data
    data = tmp_path / "data"
    (data / "saes").mkdir(parents=True)
    (data / "saes" / key).symlink_to(settings.data_dir / "saes" / key)
    (data / "thumbnails").symlink_to(settings.data_dir / "thumbnails")
    with TestClient(private_app(web_data, tmp_path, data_dir=data)) as client:
        idx, top = _busiest_example(client, key)
        body = client.get(f"/api/saes/{key}/images/{top['image_id']}").json()
        assert body["ranked"] is None and "activation cache is not on this server" in body["unavailable"] and "activations/" in body["unavailable"]
        assert (idx, -1, 0) in {(a["index"], a["bucket"], a["rank"]) for a in body["examples_of"]}
        page = client.get(f"/saes/{key}/images/{top['image_id']}")
        assert page.status_code == 200 and "activation cache is not on this server" in page.text and "top image 1" in page.text


def test_a_patch_sae_s_image_shows_where_each_feature_fires_as_its_top_images_do(patch_web_data, tmp_path):
    settings, key = patch_web_data
    with TestClient(private_app(patch_web_data, tmp_path)) as client:
        idx, top = _busiest_example(client, key)
        entry = next(e for e in client.get(f"/api/saes/{key}/images/{top['image_id']}").json()["ranked"]["by_activation"] if e["index"] == idx)
        assert len(entry["token_map"]) == 49 and max(entry["token_map"]) == pytest.approx(1.0)
        assert entry["token_map"] == pytest.approx(top["token_map"], abs=1 / 255 + 1e-6), "stored as bytes, computed exactly"
        assert 'class="veil tokens"' in client.get(f"/saes/{key}/images/{top['image_id']}").text


def _png_of(picture) -> bytes:
    import io

    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def test_an_image_of_the_set_is_analysed_as_its_own_upload_would_be(web, web_data):
    from clipscope.config import parse_config
    from clipscope.datasets import build_dataset

    client, key = web
    idx, top = _busiest_example(client, key)
    with session_scope(client.app.state.database_url) as s:
        image = s.get(Image, top["image_id"])
        config = s.scalar(select(Sae.config).where(Sae.key == key))
    picture, _ = build_dataset(parse_config(config).precompute_data, web_data[0].data_dir / "datasets").base[image.index]
    asked = {"explain": "true", "classes": "red circle, blue square, green star"}
    uploaded = client.post(f"/api/saes/{key}/analyze", params=asked, files={"file": ("x.png", _png_of(picture), "image/png")})
    by_id = client.post(f"/api/saes/{key}/analyze", params={**asked, "image_id": top["image_id"]})
    assert uploaded.status_code == by_id.status_code == 200 and by_id.json() == uploaded.json(), "the same pixels, the same answer"
    fired = {e["index"]: e["activation"] for e in by_id.json()["by_activation"]}
    assert fired[idx] == pytest.approx(top["activation"], rel=1e-2), "live fp32 against the cache's fp16"
    both = client.post(f"/api/saes/{key}/analyze", params={"image_id": top["image_id"]}, files={"file": ("x.png", _png_of(picture), "image/png")})
    assert both.status_code == 422 and client.post(f"/api/saes/{key}/analyze").status_code == 422
    assert client.post(f"/api/saes/{key}/analyze", params={"image_id": 999_999}).status_code == 404

    assert f'href="/saes/{key}/analyze?image={top["image_id"]}"' in client.get(f"/saes/{key}/images/{top['image_id']}").text
    form = client.get(f"/saes/{key}/analyze", params={"image": top["image_id"]}).text
    assert f'<input type="hidden" name="image" value="{top["image_id"]}">' in form and "of the precompute set" in form
    from tests.backend.conftest import with_token

    page = client.post(f"/saes/{key}/analyze", data=with_token(client, image=str(top["image_id"])))
    name = f"{image.dataset} {image.split} image {image.index} ({image.class_name})"
    assert page.status_code == 200 and f"fire on <strong>{name}</strong>" in page.text
    assert f'href="/saes/{key}/features/{idx}"' in page.text and 'name="upload"' in page.text, "kept, to ask again without reading it again"


def _set_data(client, key, data: dict) -> dict:
    """Set the SAE's configured dataset; returns the one it had."""
    with session_scope(client.app.state.database_url) as s:
        row = s.scalar(select(Sae).where(Sae.key == key))
        before = row.config["data"]
        row.config = {**row.config, "data": data}
        return before


def test_an_image_whose_dataset_is_not_here_or_differs_is_a_503_with_the_reason(web):
    client, key = web
    _, top = _busiest_example(client, key)
    with session_scope(client.app.state.database_url) as s:
        original = s.scalar(select(Sae.config).where(Sae.key == key))["data"]
    for data, says in (({**original, "seed": original.get("seed", 0) + 1}, "is not the image the precompute saw (its pixels differ)"),
                       ({"name": "cifar10", "split": "train", "root": "/nowhere/cifar"}, "CIFAR-10 is not under /nowhere/cifar")):
        _set_data(client, key, data)
        answer = client.post(f"/api/saes/{key}/analyze", params={"image_id": top["image_id"]})
        assert answer.status_code == 503 and says in answer.json()["detail"], answer.json()
        _set_data(client, key, original)
    assert client.post(f"/api/saes/{key}/analyze", params={"image_id": top["image_id"]}).status_code == 200
