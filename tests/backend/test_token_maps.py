"""Where a feature fires: token maps of a patch-token SAE on the feature page, in the API and in live analysis."""

import base64
import io
import re

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from clipscope.db.models import FeatureExample, Sae
from clipscope.db.session import session_scope
from clipscope.veils import VEIL_ALPHA, VEIL_RGB
from tests.backend.conftest import private_app, with_token
from tests.backend.test_pages import _png


@pytest.fixture
def patch_web(patch_web_data, tmp_path):
    with TestClient(private_app(patch_web_data, tmp_path)) as client:
        yield client, patch_web_data[1]


def _busiest_feature(settings, key) -> int:
    with session_scope(settings.resolved_database_url) as s:
        sae_id = s.scalar(select(Sae.id).where(Sae.key == key))
        features = s.scalars(select(FeatureExample.feature).where(FeatureExample.sae_id == sae_id, FeatureExample.bucket == -1)).all()
    return max(set(features), key=features.count)


def _veils(html: str) -> list[np.ndarray]:
    """The alpha channel of every veil on a page."""
    found = re.findall(r'<img class="veil" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGBA"))[..., 3] for b in found]


def test_top_examples_of_a_patch_sae_show_where_the_feature_fires(patch_web, patch_web_data):
    client, key = patch_web
    idx = _busiest_feature(patch_web_data[0], key)
    top = client.get(f"/api/saes/{key}/features/{idx}").json()["top"]
    assert top and all(len(e["token_map"]) == 49 for e in top)
    for e in top:
        assert max(e["token_map"]) == 1.0, "an image's activation is its maximum over its patches"
        assert all(0 <= v <= 1 for v in e["token_map"])
    veils = _veils(client.get(f"/saes/{key}/features/{idx}").text)
    assert len(veils) == len(top)
    for e, alpha in zip(top, veils):
        assert alpha.shape == (7, 7)
        expected = np.round(VEIL_ALPHA * (1 - np.array(e["token_map"]))).reshape(7, 7)
        assert np.abs(alpha - expected).max() <= 1, "patches in row-major order, clear where the feature fires most"


def test_a_cls_sae_has_no_token_maps(web):
    client, key = web
    top = client.get(f"/api/saes/{key}/features/0").json()["top"]
    assert top and all(e["token_map"] is None for e in top)
    assert not _veils(client.get(f"/saes/{key}/features/0").text)
    page = client.post(f"/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")}, data=with_token(client))
    assert page.status_code == 200 and "yours" not in page.text


def test_analysis_of_a_patch_sae_maps_each_feature_over_the_uploads_patches(patch_web, patch_web_data):
    client, key = patch_web
    settings = patch_web_data[0]
    body = client.post(f"/api/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")}).json()
    from clipscope.clip.hooks import residual_at
    from clipscope.clip.loading import load_clip
    from clipscope.clip.preprocess import build_transform, preprocess_descriptor
    from clipscope.config import ModelConfig
    from clipscope.sae.io import load_sae

    cfg = ModelConfig(pretrained="none", layer=10, tokens="patches")
    sae, _ = load_sae(settings.data_dir / "saes" / key / "sae")
    image = build_transform(preprocess_descriptor(cfg))(Image.open(io.BytesIO(_png())).convert("RGB"))[None]
    with torch.no_grad():
        dense = sae.encode(residual_at(load_clip(cfg).visual, image, 10)[0, 1:]).to_dense()  # [49 patches, d_sae]
    ranked = body["by_activation"]
    assert ranked and body["n_active"] == int((dense.amax(0) > 0).sum())
    for e in ranked:
        column = dense[:, e["index"]]
        assert e["activation"] == pytest.approx(column.max().item(), rel=1e-5)
        np.testing.assert_allclose(e["token_map"], (column / column.max()).numpy(), atol=1e-5)
    page = client.post(f"/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")}, data=with_token(client))
    assert page.text.count('<figure class="mapped yours"') == len(ranked) + len(body["by_relative"])
    assert "--view: url('data:image/png;base64," in page.text, "the tiles show the upload under each feature's veil"


def test_the_collage_of_a_patch_sae_is_veiled_unless_asked_not_to_be(patch_web, patch_web_data):
    client, key = patch_web
    idx = _busiest_feature(patch_web_data[0], key)
    first = client.get(f"/api/saes/{key}/features/{idx}").json()["top"][0]["token_map"]
    veiled, plain = (np.asarray(Image.open(io.BytesIO(client.get(f"/saes/{key}/features/{idx}/collage.png{q}").content)).convert("RGB")).astype(float)
                     for q in ("", "?veil=false"))
    header, cell = 24, 160
    for p, frac in enumerate(first):
        y, x = header + int((p // 7 + 0.5) * cell / 7), int((p % 7 + 0.5) * cell / 7)
        expected = plain[y, x] + (np.array(VEIL_RGB) - plain[y, x]) * round(VEIL_ALPHA * (1 - frac)) / 255
        assert np.abs(veiled[y, x] - expected).max() <= 2, f"patch {p} (fraction {frac:.2f})"
    assert (veiled != plain).any()


def test_occlusion_maps_each_feature_by_greying_out_each_patch(web, web_data):
    """A CLS-only SAE sees no location, so where a feature comes from is measured: each patch of the model
    input greyed out in turn (0 after normalisation), the feature's drop as a fraction of its activation."""
    client, key = web
    settings = web_data[0]
    plain = client.post(f"/api/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")}).json()
    assert all(e["occlusion_map"] is None for e in plain["by_activation"])
    body = client.post(f"/api/saes/{key}/analyze?occlude=true", files={"file": ("x.png", _png(), "image/png")}).json()
    assert [e["index"] for e in body["by_activation"]] == [e["index"] for e in plain["by_activation"]]
    from clipscope.clip.hooks import residual_at
    from clipscope.clip.loading import load_clip
    from clipscope.clip.preprocess import build_transform, preprocess_descriptor
    from clipscope.config import ModelConfig
    from clipscope.sae.io import load_sae

    cfg = ModelConfig(pretrained="none", layer=10)
    sae, _ = load_sae(settings.data_dir / "saes" / key / "sae")
    image = build_transform(preprocess_descriptor(cfg))(Image.open(io.BytesIO(_png())).convert("RGB"))
    greyed = image.repeat(49, 1, 1, 1)
    for p in range(49):
        r, c = divmod(p, 7)
        greyed[p, :, 32 * r : 32 * (r + 1), 32 * c : 32 * (c + 1)] = 0
    with torch.no_grad():
        dense = sae.encode(residual_at(load_clip(cfg).visual, greyed, 10)[:, 0]).to_dense()  # [49, d_sae]
    moved = False
    for e in body["by_activation"]:
        expected = (e["activation"] - dense[:, e["index"]].double()) / e["activation"]
        np.testing.assert_allclose(e["occlusion_map"], expected.numpy(), atol=1e-4)
        moved |= bool(expected.abs().max() > 1e-3)
    assert moved, "greying out patches moves some feature"
    page = client.post(f"/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")}, data=with_token(client, occlude="true"))
    assert page.text.count('class="veil occlusion"') == len(body["by_activation"]) + len(body["by_relative"])
    assert 'name="occlude" value="true" checked' in page.text
