"""Analyze an image and explain its zero-shot prediction: which features it rests on (the maths is
tested in tests/clipscope/test_attribution.py; here what the explorer asks, answers and refuses)."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import create_engine, text

from tests.backend.conftest import TINY, private_app, with_token


def _png(seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, size=(80, 96, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _analyze(client, key, **params):
    return client.post(f"/api/saes/{key}/analyze", params=params, files={"file": ("x.png", _png(), "image/png")})


def _synthetic_classes() -> list[str]:
    from worker.datasets.synthetic import COLOURS, SHAPES

    return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]


def _clean_probabilities(classes: list[str]) -> torch.Tensor:
    """Clean CLIP's zero-shot probabilities for the test image, computed here from scratch."""
    from clipscope.clip.loading import load_clip
    from clipscope.clip.preprocess import build_transform, preprocess_descriptor
    from clipscope.clip.zeroshot import build_classifier
    from clipscope.config import ModelConfig

    cfg = ModelConfig(pretrained="none", layer=10)
    clip = load_clip(cfg)
    image = build_transform(preprocess_descriptor(cfg))(Image.open(io.BytesIO(_png())).convert("RGB"))[None]
    with torch.no_grad():
        emb = clip.model.encode_image(image, normalize=True)
        classifier = build_classifier(clip.model, cfg.name, classes, TINY["evaluate"]["templates"], "cpu")
        return (clip.model.logit_scale.exp() * emb @ classifier)[0].softmax(-1)


def test_explain_answers_clip_s_prediction_over_the_dataset_classes_and_the_features_it_rests_on(web):
    client, key = web
    body = _analyze(client, key, explain=True).json()
    p = body["prediction"]
    classes = _synthetic_classes()
    probs = _clean_probabilities(classes)
    assert p["classes_from"] == "dataset" and p["n_classes"] == len(classes)
    assert [r["class"] for r in p["clean"]] == [classes[i] for i in probs.argsort(descending=True)[:5].tolist()]
    assert [r["probability"] for r in p["clean"]] == pytest.approx(probs.sort(descending=True).values[:5].tolist(), abs=1e-5)
    assert p["target"] == p["clean"][0]["class"] and p["target_probability"]["clean"] == p["clean"][0]["probability"]
    assert sum(r["probability"] for r in p["spliced"]) <= 1 + 1e-6
    assert p["n_estimated"] == body["n_active"], "every firing feature gets an estimate"
    assert 0 < len(p["features"]) <= p["n_estimated"]
    changes = [f["logit_change"] for f in p["features"]]
    assert changes == sorted(changes), "most supporting first"
    fired = {e["index"]: e["activation"] for e in body["by_activation"]}
    for f in p["features"]:
        assert f["activation"] == pytest.approx(fired[f["index"]], rel=1e-6)
        assert f["top_class"] in classes and 0 <= f["probability"] <= 1 and len(f["examples"]) <= 4
    assert "prediction" not in _analyze(client, key).json(), "only when asked for"
    few = _analyze(client, key, explain=True, measure=2).json()["prediction"]
    assert len(few["features"]) == 2 and few["n_estimated"] == p["n_estimated"]
    assert _analyze(client, key, explain=True, measure=0).status_code == 422


def test_explain_over_named_classes_and_a_chosen_target(web):
    client, key = web
    p = _analyze(client, key, explain=True, classes="cat, dog\nsushi, dog,, ").json()["prediction"]
    assert p["classes_from"] == "request" and p["n_classes"] == 3
    assert {r["class"] for r in p["clean"]} == {"cat", "dog", "sushi"}
    probs = _clean_probabilities(["cat", "dog", "sushi"])
    assert p["clean"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
    other = next(c for c in ("cat", "dog", "sushi") if c != p["target"])
    asked = _analyze(client, key, explain=True, classes="cat, dog, sushi", target=other).json()["prediction"]
    assert asked["target"] == other
    assert asked["target_probability"]["clean"] == pytest.approx(float(probs[["cat", "dog", "sushi"].index(other)]), abs=1e-5)
    assert [f["index"] for f in asked["features"]] != [f["index"] for f in p["features"]] or \
        [f["logit_change"] for f in asked["features"]] != [f["logit_change"] for f in p["features"]]


def test_a_contrast_class_explains_the_target_s_margin_over_it(web):
    client, key = web
    ask = lambda **kw: _analyze(client, key, explain=True, classes="cat, dog, sushi", **kw).json()["prediction"]  # noqa: E731
    margin, cat, dog = ask(target="cat", contrast="dog"), ask(target="cat"), ask(target="dog")
    assert margin["target"] == "cat" and margin["contrast"] == "dog" and cat["contrast"] is None
    change = lambda p: {f["index"]: f["logit_change"] for f in p["features"]}  # noqa: E731
    assert set(change(margin)) == set(change(cat)) == set(change(dog)), "the TINY SAE's 8 firing features are all measured"
    for f, c in change(margin).items():
        assert c == pytest.approx(change(cat)[f] - change(dog)[f], abs=1e-4)
    page = client.post(f"/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")},
                       data=with_token(client, explain="true", classes="cat, dog, sushi", target="cat", contrast="dog"))
    assert '<strong class="contrast-class">dog</strong>' in page.text and "margin change" in page.text
    assert 'name="contrast" value="dog"' in page.text


@pytest.mark.parametrize("params,field,says", [
    ({"classes": "cat"}, "classes", "at least two classes"),
    ({"classes": ",".join(f"c{i}" for i in range(101))}, "classes", "at most 100 classes"),
    ({"classes": "cat, " + "x" * 101}, "classes", "at most 100 characters"),
    ({"classes": "cat, dog", "target": "zebra"}, "target", "'zebra' is not one of the classes"),
    ({"target": "zebra"}, "target", "'zebra' is not one of the classes"),
    ({"classes": "cat, dog", "contrast": "zebra"}, "contrast", "contrast class 'zebra' is not one of the classes"),
    ({"classes": "cat, dog", "target": "dog", "contrast": "dog"}, "contrast", "must differ from the target"),
])
def test_unusable_questions_are_refused_with_the_reason(web, params, field, says):
    client, key = web
    r = _analyze(client, key, explain=True, **params)
    (error,) = r.json()["detail"]  # FastAPI's own shape, as /openapi.json documents it
    assert r.status_code == 422 and says in error["msg"] and error["loc"] == ["query", field]
    page = client.post(f"/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")},
                       data=with_token(client, explain="true", **params))
    assert page.status_code == 422 and 'role="alert"' in page.text and says.replace("'", "&#39;") in page.text
    assert 'name="explain" value="true" checked' in page.text, "the form keeps what was asked"


def test_a_precompute_without_class_names_asks_for_them_and_its_next_run_keeps_them(web_data, tmp_path):
    from fastapi.testclient import TestClient

    from clipscope.config import parse_config
    from worker.context import Context
    from worker.pipeline import run_precompute

    app = private_app(web_data, tmp_path)
    settings, key = web_data
    engine = create_engine(app.state.settings.database_url)
    with engine.begin() as conn:
        record = json.loads(conn.execute(text("SELECT precompute FROM saes WHERE key = :k"), {"k": key}).scalar())
        assert record["classes"] == _synthetic_classes()
        del record["classes"]
        conn.execute(text("UPDATE saes SET precompute = :p WHERE key = :k"), {"p": json.dumps(record), "k": key})
    with TestClient(app) as client:
        r = _analyze(client, key, explain=True)
        assert r.status_code == 422 and "knows no class names" in r.json()["detail"][0]["msg"]
        assert _analyze(client, key, explain=True, classes="cat, dog").status_code == 200, "named classes still work"
    reused = run_precompute(Context(app.state.settings), parse_config(TINY))
    assert reused.reused
    with engine.begin() as conn:
        assert json.loads(conn.execute(text("SELECT precompute FROM saes WHERE key = :k"), {"k": key}).scalar())["classes"] == _synthetic_classes()


def test_the_page_shows_the_prediction_and_the_features_it_rests_on(web):
    client, key = web
    p = _analyze(client, key, explain=True).json()["prediction"]
    page = client.post(f"/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")},
                       data=with_token(client, explain="true"))
    assert page.status_code == 200 and "What CLIP predicts" in page.text
    assert f'<strong class="target-class">{p["target"]}</strong>' in page.text
    assert page.text.count('<td class="change">') == len(p["features"])
    for f in p["features"]:
        assert f'href="/saes/{key}/features/{f["index"]}"' in page.text
    form = client.get(f"/saes/{key}/analyze").text
    assert 'name="explain"' in form and "the dataset&#39;s 30 classes" in form


def test_a_patch_token_sae_explains_through_the_patches(patch_web_data, tmp_path):
    """Its features live on the 49 patch tokens, which reach the pooled CLS token only through the
    last block's attention: removing one still moves the prediction, measured as for CLS features."""
    from fastapi.testclient import TestClient

    with TestClient(private_app(patch_web_data, tmp_path)) as client:
        key = patch_web_data[1]
        body = _analyze(client, key, explain=True).json()
    p = body["prediction"]
    assert p["n_estimated"] == body["n_active"] and p["features"]
    assert any(abs(f["logit_change"]) > 0 for f in p["features"])
    fired = {e["index"]: e["activation"] for e in body["by_activation"]}
    assert all(f["activation"] == pytest.approx(fired[f["index"]], rel=1e-6) for f in p["features"])
