import numpy as np
import pytest
import torch
from sqlalchemy import select

from clipscope.config import DatasetSpec, ModelConfig, PrecomputeConfig
from clipscope.db.models import Feature, FeatureExample, Image, Sae
from clipscope.db.session import session_scope
from clipscope.errors import ClipScopeError
from clipscope.naming import directions_file, name_features, output_directions, output_names
from clipscope.sae.io import load_sae
from tests.conftest import TINY, array_cache, make_context
from tests.worker.test_precompute import PC, trained  # noqa: F401  (a trained SAE over a cache, on both databases)
from clipscope.datasets import build_dataset
from clipscope.activation_cache import EMBEDDINGS, ActivationCache
from worker.precompute.naming import Namer, concept_embeddings, concepts_of, image_embeddings
from worker.precompute.stage import precompute, precompute_key


@pytest.mark.slow
def test_a_cache_extracted_without_embeddings_gets_clips_once(ctx, random_clip):
    dataset = build_dataset(DatasetSpec(name="synthetic", synthetic_size=5, image_size=48), ctx.layout.datasets)
    cache = array_cache(ctx.layout.activations, np.zeros((5, 1, 4)))
    namer = Namer(lambda: random_clip, ModelConfig(pretrained="none"))
    emb = image_embeddings(ctx, namer, cache, dataset, batch_size=2)
    with torch.no_grad():
        x = torch.stack([random_clip.preprocess(dataset[i][0]) for i in range(5)])
        expected = torch.nn.functional.normalize(random_clip.model.encode_image(x), dim=-1)
    torch.testing.assert_close(emb, expected, atol=1e-4, rtol=0)  # kept as fp16, like the activations
    assert (cache.path / EMBEDDINGS).is_file() and ActivationCache.open(cache.path).has_embeddings

    def no_clip():
        raise AssertionError("kept embeddings are reused, not recomputed")

    torch.testing.assert_close(image_embeddings(ctx, Namer(no_clip, namer.model), cache, dataset, 2), emb)
    other = array_cache(ctx.layout.activations, np.zeros((4, 1, 4)), name="four")
    with pytest.raises(ClipScopeError, match=r"has 5 images but its activation cache .+ has 4: the images changed after it was extracted"):
        image_embeddings(ctx, namer, other, dataset, 2)


def _stored(url: str, key: str, top_k: int):
    """The SAE row, its feature rows, and ``[d_sae, top_k]`` the rows of their top images as stored
    (an image's dataset index is its row: these sets are not subsampled)."""
    with session_scope(url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        features = s.execute(select(Feature).where(Feature.sae_id == sae.id).order_by(Feature.idx)).scalars().all()
        top = s.execute(
            select(FeatureExample.feature, Image.index).join(Image, Image.id == FeatureExample.image_id)
            .where(FeatureExample.sae_id == sae.id, FeatureExample.bucket == -1).order_by(FeatureExample.feature, FeatureExample.rank)
        ).all()
    top_rows = torch.full((len(features), top_k), -1, dtype=torch.long)
    for f, index in top:
        top_rows[f, int((top_rows[f] >= 0).sum())] = index
    return sae, features, top_rows


def _assert_named_as(features, expected, concepts: list[str]) -> None:
    """Each feature row's candidates, name, score and coherence equal the naming maths' ``expected``."""
    for f in features:
        want = [(concepts[c], s) for c, s in zip(expected.concepts[f.idx].tolist(), expected.scores[f.idx].tolist()) if c >= 0]
        assert [(c["name"], c["score"]) for c in f.auto_names or []] == [(n, pytest.approx(s, abs=1e-5)) for n, s in want]
        assert f.auto_name == (want[0][0] if want and want[0][1] > 0 else None)
        assert f.auto_score == (pytest.approx(want[0][1], abs=1e-5) if want else None)
        c = float(expected.coherence[f.idx])
        assert f.coherence == (None if np.isnan(c) else pytest.approx(c, abs=1e-5))


@pytest.mark.slow
def test_the_precompute_names_features_from_their_own_top_images(web_data, random_clip):  # noqa: F811
    """What the pipeline wrote equals the naming maths over the kept embeddings, the feature's top images
    as stored, and the vocabulary plus the dataset's classes."""
    settings, key = web_data
    url = make_context(settings.data_dir).database_url
    (emb_file,) = settings.data_dir.glob(f"activations/*/{EMBEDDINGS}")
    images = torch.from_numpy(np.load(emb_file))
    pc = PrecomputeConfig(**TINY["precompute"])
    sae, features, top_rows = _stored(url, key, pc.top_k)
    summary = sae.precompute["names"]
    dataset = build_dataset(DatasetSpec(**TINY["data"]), settings.data_dir / "datasets")
    concepts = concepts_of(pc.names, dataset.classes)
    assert len(concepts) == 5 + 30 and summary["concepts"] == len(concepts)
    text = concept_embeddings(Namer(lambda: random_clip, ModelConfig(pretrained="none")), concepts, pc.names.templates, "cpu")
    expected = name_features(top_rows, images, text, pc.names.candidates)
    _assert_named_as(features, expected, concepts)
    assert sum(f.auto_name is not None for f in features) > len(features) / 4
    assert summary["baseline"] == pytest.approx(expected.baseline, abs=1e-5)
    alive = expected.coherence[~expected.coherence.isnan()]
    assert summary["mean_coherence"] == pytest.approx(float(alive.mean()), abs=1e-5)
    atoms = load_sae(settings.data_dir / "saes" / key / "sae")[0].W_dec.detach()
    out_idx, out_scores = output_names(output_directions(atoms, random_clip.visual), text, pc.names.candidates)
    for f in features:  # what each atom writes toward, from the SAE's weights and CLIP's
        want = [(concepts[c], pytest.approx(v, abs=1e-5)) for c, v in zip(out_idx[f.idx].tolist(), out_scores[f.idx].tolist())]
        assert [(c["name"], c["score"]) for c in f.output_names] == want


def test_names_need_clip_and_a_changed_vocabulary_file_redoes_the_precompute(ctx, tmp_path):
    cache = array_cache(ctx.layout.activations, np.zeros((3, 1, 4)))
    vocabulary = tmp_path / "concepts.txt"
    vocabulary.write_text("soup\n")
    pc = PrecomputeConfig(names={"vocabulary": str(vocabulary)})
    with pytest.raises(ValueError, match="no CLIP was given"):
        precompute(ctx, "sae", None, cache, None, pc)
    before = precompute_key("sae", cache, pc)
    vocabulary.write_text("soup\nberries\n")
    assert precompute_key("sae", cache, pc) != before
    off = PrecomputeConfig(names={"enabled": False, "vocabulary": str(vocabulary)})
    assert precompute_key("sae", cache, off) == precompute_key("sae", cache, off.model_copy(update={"names": off.names.model_copy(update={"vocabulary": "x"})}))


@pytest.mark.slow
def test_the_pipeline_extracts_the_precompute_images_with_their_embeddings(tmp_path):
    """TINY's precompute set is its training set under another spec (a subsample larger than the set):
    the one cache they share keeps the embeddings, so naming needs no second pass; without names, none."""
    from clipscope.config import parse_config
    from worker.pipeline import run_extract

    caches = run_extract(make_context(tmp_path / "on"), parse_config(TINY))
    assert caches.precompute.path == caches.train.path and caches.precompute.has_embeddings
    assert caches.precompute.embeddings().shape == (caches.precompute.n_images, 512)
    off = {**TINY, "precompute": {**TINY["precompute"], "names": {"enabled": False}}}
    assert not run_extract(make_context(tmp_path / "off"), parse_config(off)).precompute.has_embeddings


def test_names_are_written_and_read_back_on_sqlite_and_postgresql(trained, random_clip):  # noqa: F811
    """Embeddings added to a cache extracted without them; the names and coherence stored (JSON and floats on
    both databases) equal the naming maths over the stored top images."""
    ctx, key, sae, cache, dataset, _ = trained
    rng = np.random.default_rng(5)
    cache.add_embeddings(torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(cache.n_images, 512))).float(), dim=-1).numpy())
    pc = PC.model_copy(update={"names": PC.names.model_copy(update={"enabled": True, "vocabulary": ["stripes", "grass"], "templates": ["a photo of {}."]})})
    namer = Namer(lambda: random_clip, ModelConfig(pretrained="none"))
    precompute(ctx, key, sae, cache, dataset, pc, namer=namer)
    _, features, top_rows = _stored(ctx.database_url, key, pc.top_k)
    concepts = concepts_of(pc.names, dataset.classes)
    text = concept_embeddings(namer, concepts, pc.names.templates, "cpu")
    expected = name_features(top_rows, torch.from_numpy(np.array(cache.embeddings())), text, pc.names.candidates)
    _assert_named_as(features, expected, concepts)
    assert sum(f.coherence is not None for f in features) > len(features) / 2
    first = directions_file(ctx.layout.saes / key, precompute_key(key, cache, pc))
    np.testing.assert_allclose(np.load(first).astype(np.float32), expected.directions.numpy(), atol=1e-3, rtol=0)
    other = pc.model_copy(update={"names": pc.names.model_copy(update={"vocabulary": ["soup"]})})
    precompute(ctx, key, sae, cache, dataset, other, namer=namer)
    assert [p.name for p in first.parent.glob("feature_directions-*.npy")] == [directions_file(first.parent, precompute_key(key, cache, other)).name]
