"""Which features a set of uploaded images shares (``/api/saes/{sae}/analyze-set`` and its page): each image's
activations as its own analysis gives them, ranked by how many images a feature fires on, then by lift."""

import io
import math
import re

import numpy as np
import pytest
from sqlalchemy import select

from backend.services.firing import Firing
from backend.services.image_sets import features_of_set
from clipscope.db.models import Feature, Sae
from clipscope.db.session import session_scope
from tests.backend.conftest import private_app
from tests.backend.test_pages import with_token


def _png(seed: int, size=(90, 70)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _files(*seeds):
    return [("files", (f"img{s}.png", _png(s), "image/png")) for s in seeds]


def test_each_image_s_activations_are_its_own_analysis_and_the_ranking_is_by_images_then_lift(web):
    client, key = web
    r = client.post(f"/api/saes/{key}/analyze-set?limit=500", files=_files(1, 2, 3))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["images"] == 3 and got["n_active"] == len(got["features"]) > 0
    singles = [{e["index"]: e["activation"] for e in client.post(f"/api/saes/{key}/analyze?limit=500", files={"file": ("x.png", _png(s), "image/png")}).json()["by_activation"]}
               for s in (1, 2, 3)]
    for f in got["features"]:
        expected = [single.get(f["index"], 0.0) for single in singles]
        assert f["activations"] == pytest.approx(expected, rel=1e-5, abs=1e-6), f["index"]
        assert f["images"] == sum(a > 0 for a in expected) and f["share"] == pytest.approx(f["images"] / 3)
        if f["frequency"]:
            assert f["lift"] == pytest.approx(f["share"] / f["frequency"])
            assert f["relative"] == pytest.approx([a / f["max_activation"] for a in expected])
        else:
            assert f["lift"] is None
    assert got["in_all"] == sum(f["images"] == 3 for f in got["features"])
    ranks = [(-f["images"], f["lift"] is None, -(f["lift"] or 0)) for f in got["features"]]
    assert ranks == sorted(ranks), "most images first, then the largest lift, never-firing features last among equals"
    assert all(len(f["examples"]) <= 6 for f in got["features"]) and any(f["examples"] for f in got["features"])
    top = client.post(f"/api/saes/{key}/analyze-set?limit=2", files=_files(1, 2, 3)).json()["features"]
    assert [f["index"] for f in top] == [f["index"] for f in got["features"][:2]]


def _rarest_and_commonest(session, key):
    """The SAE row, every feature's frequency, and its rarest and its commonest live feature."""
    sae = session.scalar(select(Sae).where(Sae.key == key))
    freq = dict(session.execute(select(Feature.idx, Feature.frequency).where(Feature.sae_id == sae.id)).all())
    live = sorted((f for f, q in freq.items() if q > 0), key=lambda f: (freq[f], f))
    return sae, freq, live[0], live[-1]


def test_lift_puts_what_is_particular_to_the_set_before_what_fires_everywhere(web_data):
    settings, key = web_data
    with session_scope(settings.resolved_database_url) as s:
        sae, freq, rare, common = _rarest_and_commonest(s, key)
        never = next(f for f, q in freq.items() if q == 0)
        firings = [Firing({common: 2.0, rare: 1.0, never: 0.5}), Firing({common: 1.0, rare: 0.5, never: 0.1}), Firing({common: 3.0})]
        got = features_of_set(s, sae, firings)
    assert [f["index"] for f in got["features"]] == [common, rare, never], "three images before two; then lift"
    by = {f["index"]: f for f in got["features"]}
    assert by[rare]["activations"] == [1.0, 0.5, 0.0] and by[rare]["lift"] == pytest.approx(2 / 3 / freq[rare])
    assert by[never]["lift"] is None and math.isclose(by[common]["lift"], 1 / freq[common]) and got["in_all"] == 1
    assert freq[rare] < freq[common]
    firings = [Firing({common: 1.0, rare: 1.0}), Firing({common: 1.0, rare: 1.0})]
    with session_scope(settings.resolved_database_url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        assert [f["index"] for f in features_of_set(s, sae, firings)["features"]] == [rare, common], "equal counts: the rarer first"


def test_too_few_too_many_or_a_bad_image_is_refused_naming_it(web_data, tmp_path):
    from fastapi.testclient import TestClient

    with TestClient(private_app(web_data, tmp_path, analyze_set_max=3)) as client:
        key = web_data[1]
        r = client.post(f"/api/saes/{key}/analyze-set", files=_files(1))
        assert r.status_code == 422 and r.json()["detail"] == "Choose from 2 to 3 images to compare, counter-examples included (chosen: 1)."
        r = client.post(f"/api/saes/{key}/analyze-set", files=_files(1, 2) + [("without", f[1]) for f in _files(3, 4)])
        assert r.status_code == 422 and r.json()["detail"].endswith("(chosen: 2 + 2 without).")
        assert client.post(f"/api/saes/{key}/analyze-set", files=_files(1, 2, 3, 4)).status_code == 422
        bad = [*_files(1), ("files", ("notes.txt", b"just some text, not an image", "text/plain"))]
        r = client.post(f"/api/saes/{key}/analyze-set", files=bad)
        assert r.status_code in (400, 415) and r.json()["detail"].startswith("notes.txt: ")
        limit = client.app.state.settings.max_upload_bytes
        big = [("files", (f"big{i}.jpg", b"\xff" * (limit // 2 + 40_000), "image/jpeg")) for i in range(2)]
        assert client.post(f"/api/saes/{key}/analyze-set", files=big).status_code == 413, "every image together within the limit"


def test_the_page_shows_each_image_as_clip_saw_it_and_the_ranked_features(web):
    client, key = web
    refused = client.post(f"/saes/{key}/analyze-set", files=_files(4, 5))
    assert refused.status_code == 403 and "security token" in refused.text, "the page's form carries its CSRF token"
    form = client.get(f"/saes/{key}/analyze-set")
    assert form.status_code == 200 and 'name="files" accept="image/*" multiple required' in form.text and "2 to 16 images" in form.text
    assert f'href="/saes/{key}/analyze-set"' in client.get(f"/saes/{key}/analyze").text
    page = client.post(f"/saes/{key}/analyze-set", data=with_token(client), files=_files(4, 5))
    assert page.status_code == 200 and page.text.count('alt="img4.png as CLIP saw it"') == 1 and 'src="data:image/png;base64,' in page.text
    cells = re.findall(r'<span class="cell( off)?"', page.text)
    assert "features fire on at least one of the 2 images" in page.text and cells and len(cells) % 2 == 0 and "counter-examples" not in page.text
    assert '<strong class="set-count">2 of 2</strong>' in page.text or '<strong class="set-count">1 of 2</strong>' in page.text
    empty = client.post(f"/saes/{key}/analyze-set", data=with_token(client), files=[("files", ("", b"", "application/octet-stream"))])
    assert empty.status_code == 422 and "(chosen: 0)." in empty.text and "<form" in empty.text
    data = with_token(client)
    page = client.post(f"/saes/{key}/analyze-set", data=data, files=_files(4, 5) + [("without", f[1]) for f in _files(6)])
    assert page.status_code == 200 and 'alt="img6.png as CLIP saw it (without)"' in page.text and "minus the share of the 1 counter-examples" in page.text
    assert len(re.findall(r'<span class="cell( off)?"', page.text)) == 3 * page.text.count('<li class="feature-row">'), "two images and one counter-example a row"
    assert "<option selected>30</option><option>100</option><option>300</option>" in page.text


def test_the_page_shows_as_many_features_as_chosen(web, monkeypatch):
    import backend.routes.pages as pages

    client, key = web
    monkeypatch.setattr(pages, "SET_LIMITS", (3, 5))  # below the 8 features each image of the tiny SAE fires
    rows = lambda data: client.post(f"/saes/{key}/analyze-set", data={**with_token(client), **data}, files=_files(4, 5))  # noqa: E731
    assert rows({"limit": "5"}).text.count('<li class="feature-row">') == 5 and "<option selected>5</option>" in rows({"limit": "5"}).text
    assert rows({}).text.count('<li class="feature-row">') == 3, "the default: the first choice"
    assert rows({"limit": "100"}).text.count('<li class="feature-row">') == 3, "not a choice: the default"


def test_counter_examples_rank_by_contrast_with_their_own_activations(web):
    client, key = web
    without = [("without", f[1]) for f in _files(4, 5)]
    got = client.post(f"/api/saes/{key}/analyze-set?limit=500", files=_files(1, 2, 3) + without).json()
    assert (got["images"], got["without"]) == (3, 2)
    singles = {s: {e["index"]: e["activation"] for e in client.post(f"/api/saes/{key}/analyze?limit=500", files={"file": ("x.png", _png(s), "image/png")}).json()["by_activation"]}
               for s in (4, 5)}
    for f in got["features"]:
        expected = [singles[s].get(f["index"], 0.0) for s in (4, 5)]
        assert f["activations_without"] == pytest.approx(expected, rel=1e-5, abs=1e-6) and f["images_without"] == sum(a > 0 for a in expected)
        assert f["contrast"] == pytest.approx(f["images"] / 3 - f["images_without"] / 2) and f["images"] >= 1
    ranks = [(-f["contrast"], f["lift"] is None, -(f["lift"] or 0)) for f in got["features"]]
    assert ranks == sorted(ranks), "the largest contrast first, then lift"
    plain = client.post(f"/api/saes/{key}/analyze-set?limit=500", files=_files(1, 2, 3)).json()
    assert plain["without"] == 0 and all(f["contrast"] is None and f["activations_without"] is None for f in plain["features"])
    assert {f["index"] for f in plain["features"]} == {f["index"] for f in got["features"]}, "the same features: those firing on the set"


def test_a_feature_also_on_the_counter_examples_ranks_below_one_only_on_the_set(web_data):
    settings, key = web_data
    with session_scope(settings.resolved_database_url) as s:
        sae, freq, rare, common = _rarest_and_commonest(s, key)
        both = [Firing({rare: 1.0, common: 1.0}), Firing({rare: 2.0, common: 1.0})]
        got = features_of_set(s, sae, both, [Firing({rare: 0.5}), Firing({rare: 0.1, 12345: 9.0})])
    by = {f["index"]: f for f in got["features"]}
    assert [f["index"] for f in got["features"]] == [common, rare], "common is on none of the counter-examples: contrast 1 against 0"
    assert by[rare]["contrast"] == 0 and by[rare]["activations_without"] == [0.5, 0.1] and by[common]["activations_without"] == [0.0, 0.0]
    assert 12345 not in by, "a feature only on the counter-examples is not one the set shares"
