"""Analyze an image and explain its zero-shot prediction: which features it rests on (the maths is
tested in tests/clipscope/test_attribution.py; here what the explorer asks, answers and refuses)."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import create_engine, text

from tests.backend.conftest import private_app, with_token
from tests.conftest import TINY


def _png(seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, size=(80, 96, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _analyze(client, key, **params):
    return client.post(f"/api/saes/{key}/analyze", params=params, files={"file": ("x.png", _png(), "image/png")})


def _synthetic_classes() -> list[str]:
    from clipscope.datasets.synthetic import COLOURS, SHAPES

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
    body = _analyze(client, key, explain=True, limit=500).json()  # every firing feature: an explained one need not rank high
    p = body["prediction"]
    classes = _synthetic_classes()
    probs = _clean_probabilities(classes)
    assert p["classes_from"] == "dataset" and p["n_classes"] == len(classes)
    assert [r["class"] for r in p["clean"]] == [classes[i] for i in probs.argsort(descending=True)[:5].tolist()]
    assert [r["probability"] for r in p["clean"]] == pytest.approx(probs.sort(descending=True).values[:5].tolist(), abs=1e-5)
    assert p["target"] == p["clean"][0]["class"] and p["target_probability"]["clean"] == p["clean"][0]["probability"]
    assert sum(r["probability"] for r in p["spliced"]) <= 1 + 1e-6
    assert p["n_estimated"] == body["n_active"] == len(body["by_activation"]), "every firing feature gets an estimate"
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


def test_an_explanation_over_the_dataset_classes_reads_the_classifier_the_precompute_kept(web, monkeypatch):
    client, key = web
    kept = {p.name for p in (client.app.state.settings.data_dir / "models" / "classifiers").iterdir()}
    assert kept, "the pipeline kept classifiers"

    def built_again(*_args, **_kwargs):
        raise RuntimeError("built again")

    monkeypatch.setattr("clipscope.clip.classifiers.build_classifier", built_again)
    body = _analyze(client, key, explain=True)
    assert body.status_code == 200 and body.json()["prediction"]["n_classes"] == len(_synthetic_classes())
    with pytest.raises(RuntimeError, match="built again"):  # these classes were never kept
        _analyze(client, key, explain=True, classes="cat, dog")


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
        body = _analyze(client, key, explain=True, limit=500).json()  # every firing feature: an explained one need not rank high
    p = body["prediction"]
    assert p["n_estimated"] == body["n_active"] == len(body["by_activation"]) and p["features"]
    assert any(abs(f["logit_change"]) > 0 for f in p["features"])
    fired = {e["index"]: e["activation"] for e in body["by_activation"]}
    assert all(f["activation"] == pytest.approx(fired[f["index"]], rel=1e-6) for f in p["features"])


def _steered_logits(data_dir, key, classes: list[str], edits: dict[int, tuple[str, float]], tokens: str = "cls",
                    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Clean and edited zero-shot logits of the test image, from scratch: the SAE's code of its tokens,
    then CLIP's own forward pass with the stream moved by (new - old activation) x atom, token by
    token; and each edited feature's largest activation before and after."""
    from clipscope.clip.hooks import residual_at, token_slice
    from clipscope.clip.loading import load_clip
    from clipscope.clip.preprocess import build_transform, preprocess_descriptor
    from clipscope.clip.zeroshot import build_classifier
    from clipscope.config import ModelConfig
    from clipscope.sae.io import load_sae
    from tests.clipscope.stream import hooked_logits

    cfg = ModelConfig(pretrained="none", layer=10)
    clip, sae = load_clip(cfg), load_sae(data_dir / "saes" / key / "sae", "cpu")[0]
    image = build_transform(preprocess_descriptor(cfg))(Image.open(io.BytesIO(_png())).convert("RGB"))[None]
    with torch.no_grad():
        code = sae.encode(residual_at(clip.visual, image, 10)[0, token_slice(tokens)].float())
        before = {f: (code.values * (code.indices == f)).sum(-1) for f in edits}  # [tokens]
        after = {f: before[f] * v if op == "*" else torch.full_like(before[f], v) for f, (op, v) in edits.items()}
        added = sum((after[f] - before[f])[:, None] * sae.W_dec[f][None] for f in edits)
        classifier = build_classifier(clip.model, cfg.name, classes, TINY["evaluate"]["templates"], "cpu")
        clean = hooked_logits(clip.model, image, classifier, tokens)
        steered = hooked_logits(clip.model, image, classifier, tokens, -added)
    return clean, steered, {f: (float(before[f].max()), float(after[f].max())) for f in edits}


def test_edits_answer_what_clip_predicts_once_the_features_are_changed_in_the_stream(web, web_data):
    client, key = web
    fired = [e["index"] for e in _analyze(client, key).json()["by_activation"]]
    silent = next(f for f in range(64) if f not in fired)
    asked = {fired[0]: ("*", 4.0), fired[1]: ("=", 0.0), silent: ("=", 2.5)}
    body = _analyze(client, key, edits=f"{fired[0]}*4, #{fired[1]} = 0\n{silent}=2.5").json()
    s, classes = body["steering"], _synthetic_classes()
    assert "prediction" not in body, "edits alone do not explain"
    clean_logits, steered_logits, acts = _steered_logits(web_data[0].data_dir, key, classes, asked)
    clean, steered = clean_logits.softmax(-1), steered_logits.softmax(-1)
    assert s["classes_from"] == "dataset" and s["n_classes"] == len(classes)
    for side, probs in (("clean", clean), ("steered", steered)):
        assert [r["class"] for r in s[side]] == [classes[i] for i in probs.argsort(descending=True)[:5].tolist()]
        assert [r["probability"] for r in s[side]] == pytest.approx(probs.sort(descending=True).values[:5].tolist(), abs=1e-5)
    target = classes.index(s["target"])
    assert target == int(clean.argmax())
    assert s["target_probability"] == pytest.approx({"clean": float(clean[target]), "steered": float(steered[target])}, abs=1e-5)
    assert s["target_logit_change"] == pytest.approx(float(steered_logits[target] - clean_logits[target]), abs=2e-4)
    assert [(e["index"], e["op"], e["value"]) for e in s["edits"]] == [(fired[0], "scale", 4.0), (fired[1], "set", 0.0), (silent, "set", 2.5)]
    for e in s["edits"]:
        assert (e["before"], e["after"]) == pytest.approx(acts[e["index"]], rel=1e-5, abs=1e-6)
    moved = (steered - clean).abs()
    assert [m["class"] for m in s["moved"]] == [classes[i] for i in moved.argsort(descending=True)[:5].tolist()]
    both = _analyze(client, key, explain=True, edits=f"{fired[0]}*4", classes="cat, dog", target="dog").json()
    assert both["prediction"]["target"] == both["steering"]["target"] == "dog", "one question, two answers"


@pytest.mark.parametrize("edits,says", [
    ("3 = zero", "Cannot read the edit '3 = zero'"),
    ("3+1", "Cannot read the edit"),
    ("64=1", "Feature 64 does not exist: this SAE has features 0 to 63"),
    ("-2=1", "Cannot read the edit"),
    ("3=1, 3*2", "Feature 3 is edited twice"),
    ("3=1e5", "beyond ±10000"),
    (",".join(f"{i}=0" for i in range(33)), "Edit at most 32 features (33 given)"),
])
def test_unusable_edits_are_refused_with_the_reason(web, edits, says):
    client, key = web
    r = _analyze(client, key, edits=edits)
    (error,) = r.json()["detail"]
    assert r.status_code == 422 and says in error["msg"] and error["loc"] == ["query", "edits"]
    page = client.post(f"/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")}, data=with_token(client, edits=edits))
    assert page.status_code == 422 and 'role="alert"' in page.text and says.replace("'", "&#39;") in page.text
    assert f'name="edits" value="{edits}"' in page.text.replace("&#39;", "'"), "the form keeps what was asked"


def test_the_page_shows_the_prediction_after_the_edits(web):
    client, key = web
    fired = [e["index"] for e in _analyze(client, key).json()["by_activation"]]
    s = _analyze(client, key, edits=f"{fired[0]}=0, {fired[1]}*3").json()["steering"]
    page = client.post(f"/saes/{key}/analyze", files={"file": ("x.png", _png(), "image/png")},
                       data=with_token(client, edits=f"{fired[0]}=0, {fired[1]}*3"))
    assert page.status_code == 200 and "What CLIP predicts after your edits" in page.text
    assert "What CLIP predicts, and which features it rests on" not in page.text
    assert f'<strong class="steered-probability">{100 * s["target_probability"]["steered"]:.1f} %</strong>' in page.text
    assert "= 0</td>" in page.text and "× 3</td>" in page.text
    for e in s["edits"]:
        assert f'href="/saes/{key}/features/{e["index"]}"' in page.text
    assert page.text.count("<tr><td>") >= len(s["moved"])


def _page(client, key, file: bool = True, **data):
    files = {"file": ("x.png", _png(), "image/png")} if file else {"file": ("", b"", "application/octet-stream")}  # as a browser sends no file
    return client.post(f"/saes/{key}/analyze", files=files, data=with_token(client, **data))


def _kept_token(page) -> str:
    import re

    (token,) = re.findall(r'<input type="hidden" name="upload" value="([^"]+)">', page.text)
    return token


def test_the_page_asks_again_about_the_image_it_showed_without_a_new_upload(web):
    """Analysed again from what CLIP saw, the image gives what the upload gave: the same steering
    answer as the API computes from the file."""
    client, key = web
    first = _page(client, key)
    token = _kept_token(first)
    assert 'class="kept">x.png</strong>' in first.text and 'name="file" accept="image/*">' in first.text, "the file is optional now"
    fired = [e["index"] for e in _analyze(client, key).json()["by_activation"]]
    edits = f"{fired[0]}=0, {fired[1]}*3"
    s = _analyze(client, key, edits=edits).json()["steering"]
    again = _page(client, key, file=False, upload=token, edits=edits)
    assert again.status_code == 200 and "What CLIP predicts after your edits" in again.text
    assert f'<strong class="steered-probability">{100 * s["target_probability"]["steered"]:.1f} %</strong>' in again.text
    assert _kept_token(again) == token, "asking again keeps one entry, not one per question"
    bad = _page(client, key, file=False, upload=token, edits="3 = zero")
    assert bad.status_code == 422 and _kept_token(bad) == token, "a mistyped question keeps the image"
    assert first.text.split("features fire on")[0].count("<figure") == again.text.split("features fire on")[0].count("<figure")


def test_the_analysis_of_the_kept_image_equals_the_upload_s(web):
    from clipscope.db.models import Sae
    from clipscope.db.session import session_scope

    client, key = web
    app = client.app
    with session_scope(app.state.database_url) as session:
        sae = session.query(Sae).filter_by(key=key).one()
        session.expunge(sae)
    analyzer = app.state.analysis.analyzer
    (upload,) = analyzer.analyse(sae, [Image.open(io.BytesIO(_png())).convert("RGB")])
    (again,) = analyzer.analyse(sae, [upload.model_view])
    assert again.activations == upload.activations
    assert np.array_equal(np.asarray(again.model_view), np.asarray(upload.model_view))


def test_without_a_file_or_a_kept_image_the_page_says_what_to_do(web, web_data, tmp_path):
    from fastapi.testclient import TestClient

    client, key = web
    none = _page(client, key, file=False)
    assert none.status_code == 422 and "Choose an image to analyze." in none.text
    gone = _page(client, key, file=False, upload="not-a-token", edits="1=0")
    assert gone.status_code == 422 and "no longer kept (this server keeps the last 64)" in gone.text
    assert 'name="edits" value="1=0"' in gone.text and 'name="upload"' not in gone.text
    with TestClient(private_app(web_data, tmp_path, analyze_kept=1)) as small:
        token = _kept_token(_page(small, key))
        assert _page(small, key, file=False, upload=token).status_code == 200
        _page(small, key)  # a second image: the first one goes
        assert "no longer kept (this server keeps the last 1)" in _page(small, key, file=False, upload=token).text


def test_a_feature_page_links_to_steering_an_image_with_the_feature_at_its_largest_activation(web):
    import html
    import re

    client, key = web
    rows = client.get(f"/api/saes/{key}/features", params={"sort": "max", "order": "desc"}).json()["features"]
    feature = rows[0]
    page = client.get(f"/saes/{key}/features/{feature['index']}").text
    (href,) = re.findall(r'<a class="steer-link" href="([^"]+)"', page)
    form = client.get(html.unescape(href)).text
    asked = f"{feature['index']}={feature['max_activation']:.3g}"
    assert f'name="edits" value="{asked}"' in form
    (edit,) = _analyze(client, key, edits=asked).json()["steering"]["edits"]
    assert edit["after"] == pytest.approx(feature["max_activation"], rel=1e-3) and edit["op"] == "set"


def test_a_patch_token_sae_is_steered_at_its_patches(patch_web_data, tmp_path):
    """Setting a feature applies at each of the 49 patch tokens it reads, scaling only where it fires:
    the answer is CLIP's own forward pass with the patches edited so."""
    from fastapi.testclient import TestClient

    with TestClient(private_app(patch_web_data, tmp_path)) as client:
        key = patch_web_data[1]
        fired = _analyze(client, key).json()["by_activation"]
        body = _analyze(client, key, edits=f"{fired[0]['index']}*2, {fired[1]['index']}=3").json()
    classes = _synthetic_classes()
    clean, steered, acts = _steered_logits(patch_web_data[0].data_dir, key, classes,
                                           {fired[0]["index"]: ("*", 2.0), fired[1]["index"]: ("=", 3.0)}, tokens="patches")
    s = body["steering"]
    target = classes.index(s["target"])
    assert s["target_logit_change"] == pytest.approx(float(steered[target] - clean[target]), abs=2e-4)
    assert [r["probability"] for r in s["steered"]] == pytest.approx(steered.softmax(-1).sort(descending=True).values[:5].tolist(), abs=1e-5)
    for e in s["edits"]:
        assert (e["before"], e["after"]) == pytest.approx(acts[e["index"]], rel=1e-5)
    assert s["edits"][0]["before"] == pytest.approx(fired[0]["activation"], rel=1e-5)


def test_an_upload_explained_and_edited_goes_through_the_encoder_once(web, monkeypatch):
    from clipscope.sae.model import TopKSAE

    client, key = web
    assert _analyze(client, key).status_code == 200  # CLIP and the SAE loaded
    encoded, encode = [], TopKSAE.encode
    monkeypatch.setattr(TopKSAE, "encode", lambda self, x, *args, **kwargs: encoded.append(x.shape) or encode(self, x, *args, **kwargs))
    body = _analyze(client, key, explain=True, edits="0*2, 1=1").json()
    assert body["prediction"]["features"] and body["steering"]["edits"]
    assert len(encoded) == 1, "the explanation and the edits read the analysis's code"
