"""``clipscope.notebook``: an SAE from Python gives the numbers its pages show, over its precompute set and
for any image, on the ready SAEs the web tests share (CLS-only, and over the 49 patch tokens)."""

import shutil

import numpy as np
import pytest
import torch
from sqlalchemy import select

from clipscope.db.models import Feature, FeatureExample, Image, Sae
from clipscope.db.session import session_scope
from clipscope.errors import ClipScopeError
from clipscope.notebook import open_sae, saes
from tests.conftest import copy_data_dir


@pytest.fixture(params=["web_data", "patch_web_data"])
def ready(request, tmp_path):
    """A private copy of a ready SAE's data dir (``set_activations`` keeps its thresholds there), opened."""
    settings, key = request.getfixturevalue(request.param)
    copy_data_dir(settings.data_dir, tmp_path / "data")
    settings = settings.model_copy(update={"data_dir": tmp_path / "data"})
    return settings, open_sae(key, data_dir=settings.data_dir, device="cpu")


def _stored(settings, key):
    with session_scope(settings.resolved_database_url) as s:
        sae_id = s.scalar(select(Sae.id).where(Sae.key == key))
        features = {f.idx: (f.n_active, f.max_activation) for f in s.scalars(select(Feature).where(Feature.sae_id == sae_id))}
        tops = s.execute(select(FeatureExample.feature, Image.index, FeatureExample.activation).join(Image, Image.id == FeatureExample.image_id)
                         .where(FeatureExample.sae_id == sae_id, FeatureExample.bucket == -1)).all()
    return features, tops


def test_set_activations_are_the_precomputes_statistics_and_top_images(ready):
    settings, s = ready
    features, tops = _stored(settings, s.key)
    on = s.set_activations(list(range(s.sae.d_sae)), batch_size=16)  # three batches
    assert on.values.shape == (40, s.sae.d_sae) and on.values.dtype == np.float32 and on.features == list(range(s.sae.d_sae))
    assert [int((on.values[:, f] > 0).sum()) for f in range(s.sae.d_sae)] == [features[f][0] for f in range(s.sae.d_sae)]
    assert np.allclose(on.values.max(0), [features[f][1] for f in range(s.sae.d_sae)], rtol=1e-5)
    row_of = {int(i): r for r, i in enumerate(on.indices)}
    assert tops and all(abs(on.values[row_of[index], f] - act) <= 1e-5 * abs(act) for f, index, act in tops)
    assert on.classes and len(on.labels) == 40 and set(on.labels) <= set(range(len(on.classes)))


def test_every_feature_comes_sparse_with_the_same_values_and_at_most_k_an_image(ready):
    _, s = ready
    few = s.set_activations([7, 3, 7], batch_size=16)
    every = s.set_activations(batch_size=16)
    assert every.features is None and every.values.is_sparse and every.values.shape == (40, s.sae.d_sae)
    dense = every.values.to_dense().numpy()
    assert np.array_equal(few.values, dense[:, [7, 3, 7]])
    assert ((dense > 0).sum(1) <= s.row.k * (49 if s.row.tokens == "patches" else 1)).all() and every.values._nnz() == (dense > 0).sum()


def test_an_image_encoded_live_gives_its_cached_activations_from_a_picture_or_a_path(ready, tmp_path):
    _, s = ready
    on = s.set_activations()
    dense = on.values.to_dense()
    row = int(dense.sum(1).argmax())
    picture, label = s.dataset()[row]
    assert label == on.labels[row]
    picture.save(tmp_path / "one.png")
    live = s.encode([picture, tmp_path / "one.png", str(tmp_path / "one.png")], batch_size=2)
    assert live.shape == (3, s.sae.d_sae) and torch.equal(live[0], live[1]), "a picture and its file are one image"
    assert torch.allclose(live[1], live[2], rtol=1e-4, atol=1e-5), "a batch of one: the same up to the products' rounding"
    assert torch.allclose(live[0], dense[row], atol=2e-2 * float(dense[row].max())), "the cache holds the same stream in fp16"
    assert s.encode([]).shape == (0, s.sae.d_sae)
    assert s.residual([picture]).shape == (1, 49 if s.row.tokens == "patches" else 1, 768)


def test_what_cannot_be_answered_is_one_sentence(web_data, tmp_path):
    settings, key = web_data
    assert key in [e.key for e in saes(settings.data_dir)]
    with pytest.raises(ClipScopeError, match=rf"No SAE 'nope' in .*; its SAEs: .*{key}"):
        open_sae("nope", data_dir=settings.data_dir)
    s = open_sae(key, data_dir=settings.data_dir, device="cpu")
    with pytest.raises(ClipScopeError, match=r"Features must lie in 0\.\.63"):
        s.set_activations([64])
    copy = tmp_path / "data"
    shutil.copytree(settings.data_dir, copy, ignore=shutil.ignore_patterns("saes", "activations"))
    with pytest.raises(ClipScopeError, match=rf"The weights of SAE {key} are not on this machine .*copy its folder"):
        open_sae(key, data_dir=copy, device="cpu")
    shutil.copytree(settings.data_dir / "saes", copy / "saes")
    with pytest.raises(ClipScopeError, match="its precompute's activation cache is not on this server"):
        open_sae(key, data_dir=copy, device="cpu").set_activations([1])


def test_a_feature_s_top_rows_are_its_pages_top_images_and_its_collage_draws_them(ready):
    settings, s = ready
    features, tops = _stored(settings, s.key)
    on = s.set_activations()
    by_feature: dict[int, list] = {}
    for f, index, act in tops:
        by_feature.setdefault(f, []).append((index, act))
    for f in list(by_feature)[:5]:
        stored = sorted(by_feature[f], key=lambda e: -e[1])
        got = s.top(f, k=len(stored))
        assert [round(a, 4) for _, a in got] == [round(a, 4) for _, a in stored]
        assert {int(on.indices[row]) for row, _ in got} == {index for index, _ in stored}, "the same images"
    dead = next((f for f, (n, _) in features.items() if n == 0), None)
    if dead is not None:  # (the patch-token SAE may have none)
        assert s.top(dead) == [], "a dead feature has no top images"
    picture = s.collage(next(iter(by_feature)))
    assert picture.size == (4 * 160, 24 + 3 * (160 + 18))
    assert len(np.unique(np.asarray(picture.convert("L")))) > 10, "drawn, not blank"


def test_the_feature_table_holds_the_lists_statistics_and_each_current_label(web_data, tmp_path):
    from fastapi.testclient import TestClient

    from backend.app import create_app
    from backend.services.labels import save_label
    from tests.conftest import copy_data_dir

    settings, key = web_data
    url = copy_data_dir(settings.data_dir, tmp_path / "data")
    with session_scope(url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        save_label(s, sae, 3, "berries", "semantic", "ann", 0)
        save_label(s, sae, 3, "berries on cream", "visual", "bob", 1)
    rows = open_sae(key, data_dir=tmp_path / "data", device="cpu").features()
    assert [r["index"] for r in rows] == list(range(64))
    with TestClient(create_app(settings.model_copy(update={"data_dir": tmp_path / "data", "database_url": url}))) as client:
        listed = client.get(f"/api/saes/{key}/features", params={"per_page": 500}).json()["features"]
    for mine, theirs in zip(rows, listed):
        assert {k: mine[k] for k in ("index", "n_active", "frequency", "max_activation", "is_dead", "top_class", "auto_name", "coherence")} == \
            {k: theirs[k] for k in ("index", "n_active", "frequency", "max_activation", "is_dead", "top_class", "auto_name", "coherence")}
    assert (rows[3]["label"], rows[3]["category"], rows[3]["author"], rows[3]["revision"]) == ("berries on cream", "visual", "bob", 2)
    assert rows[4]["label"] is None and rows[4]["revision"] is None


def test_shared_ranks_a_set_as_the_several_images_page_does(web_data, tmp_path):
    import io

    from fastapi.testclient import TestClient
    from PIL import Image as PILImage

    from tests.backend.conftest import private_app

    settings, key = web_data
    pictures = [PILImage.fromarray(np.random.default_rng(seed).integers(0, 255, (70, 90, 3), dtype=np.uint8)) for seed in range(5)]
    s = open_sae(key, data_dir=settings.data_dir, device="cpu")
    mine = s.shared(pictures[:3], without=pictures[3:], limit=None)

    def png(p):
        out = io.BytesIO()
        p.save(out, "PNG")
        return out.getvalue()

    files = [("files", (f"{i}.png", png(p), "image/png")) for i, p in enumerate(pictures[:3])]
    files += [("without", (f"{i}.png", png(p), "image/png")) for i, p in enumerate(pictures[3:])]
    with TestClient(private_app(web_data, tmp_path)) as client:
        page = client.post(f"/api/saes/{key}/analyze-set?limit=500", files=files).json()["features"]
    assert [r["index"] for r in mine] == [r["index"] for r in page] and len(mine) >= 8
    for a, b in zip(mine, page):
        assert a["activations"] == pytest.approx(b["activations"], rel=1e-4, abs=1e-5)
        assert a["activations_without"] == pytest.approx(b["activations_without"], rel=1e-4, abs=1e-5)
        assert (a["images"], a["images_without"], a["auto_name"]) == (b["images"], b["images_without"], b["auto_name"])
        assert a["lift"] == pytest.approx(b["lift"]) and a["contrast"] == pytest.approx(b["contrast"])
    assert len(s.shared(pictures[:2])) <= 30 and s.shared(pictures[:2])[0]["contrast"] is None
    with pytest.raises(ClipScopeError, match="at least one image"):
        s.shared([])


def test_after_the_first_pass_a_few_features_encode_only_the_images_they_may_fire_on(ready, monkeypatch):
    _, s = ready
    kept = s.layout.saes / s.key / "set-thresholds" / f"{s.row.precompute['key']}.npy"
    assert not kept.exists()
    every = s.set_activations(batch_size=16).values.to_dense().numpy()  # the full pass keeps each row's threshold
    assert kept.is_file() and np.load(kept).shape == (40 * (49 if s.row.tokens == "patches" else 1),)
    encoded = []
    real = s.sae.encode
    monkeypatch.setattr(s.sae, "encode", lambda x: encoded.append(len(x)) or real(x))
    for f in range(s.sae.d_sae):
        encoded.clear()
        one = s.set_activations([f], batch_size=16).values[:, 0]
        assert np.array_equal(one > 0, every[:, f] > 0), f"feature {f} fires on the same images"
        assert np.allclose(one, every[:, f], rtol=1e-5, atol=0), "with the same values, to the products' rounding"
        assert sum(encoded) < 40 * (49 if s.row.tokens == "patches" else 1) or (every[:, f] > 0).sum() > 20, "only the candidates encoded"
    rare = int(np.argmin(np.where((every > 0).sum(0) > 0, (every > 0).sum(0), 99)))
    encoded.clear()
    s.set_activations([rare], batch_size=16)
    assert 0 < sum(encoded) < 40 * (49 if s.row.tokens == "patches" else 1) / 2, "a rare feature: a few images encoded"
    np.save(kept, np.zeros(3, dtype=np.float32))  # thresholds that do not fit the set: ignored, the full pass again
    encoded.clear()
    s.set_activations([rare], batch_size=16)
    assert sum(encoded) == 40 * (49 if s.row.tokens == "patches" else 1) and np.load(kept).shape != (3,)
