import re

import numpy as np
import pytest
import torch

from clipscope.activation_cache import ActivationCache
from clipscope.clip.hooks import residual_at
from clipscope.clip.preprocess import build_transform, preprocess_descriptor
from clipscope.config import DatasetSpec, ExtractConfig, ModelConfig
from clipscope.errors import ClipScopeError
from clipscope.datasets import build_dataset
from worker.extract import extract

MODEL = ModelConfig(pretrained="none", layer=3, tokens="cls")
SPEC = DatasetSpec(name="synthetic", synthetic_size=10, image_size=64)
SMALL = ExtractConfig(batch_size=4, flush_every=4)


def test_cache_holds_fp16_hooked_activations_and_metadata(ctx, random_clip):
    result = extract(ctx, MODEL, SPEC, SMALL, clip=random_clip)
    cache = result.cache
    assert result.extracted == 10 and cache.complete
    acts = cache.activations()
    assert acts.dtype == np.float16 and acts.shape == (10, 1, 768)
    assert cache.meta["key"]["weights"] == {"source": "random", "init_seed": 0}
    assert cache.meta["key"]["layer"] == 3
    ds = build_dataset(SPEC, ctx.layout.datasets)
    image = build_transform(preprocess_descriptor(MODEL))(ds[7][0])[None]
    with torch.no_grad():
        expected = residual_at(random_clip.visual, image, 3)[0, 0]
    np.testing.assert_allclose(acts[7, 0].astype(np.float32), expected.numpy(), rtol=2e-3, atol=2e-3)
    assert list(cache.labels()) == [ds[i][1] for i in range(10)]


def test_a_complete_cache_is_reused_without_clip(ctx, random_clip):
    first = extract(ctx, MODEL, SPEC, SMALL, clip=random_clip)
    second = extract(ctx, MODEL, SPEC, SMALL, clip=None)  # would have to load CLIP if it extracted
    assert second.extracted == 0 and second.cache.path == first.cache.path


def test_another_layer_or_token_mode_gets_another_cache(ctx, random_clip):
    a = extract(ctx, MODEL, SPEC, SMALL, clip=random_clip).cache
    b = extract(ctx, MODEL.model_copy(update={"layer": 2}), SPEC, SMALL, clip=random_clip).cache
    c = extract(ctx, MODEL.model_copy(update={"tokens": "patches"}), SPEC, SMALL, clip=random_clip).cache
    assert len({a.path, b.path, c.path}) == 3
    assert c.activations().shape == (10, 49, 768)


def test_a_killed_extraction_resumes_and_ends_equal_to_an_uninterrupted_one(ctx, tmp_path, random_clip, monkeypatch):
    from tests.conftest import make_context
    from clipscope.datasets.synthetic import SyntheticShapes

    reference = extract(make_context(tmp_path / "ref"), MODEL, SPEC, SMALL, clip=random_clip).cache
    original = SyntheticShapes.__getitem__
    seen = []

    def dies_at_image_6(self, index):
        if index == 6:
            raise KeyboardInterrupt("killed")
        seen.append(index)
        return original(self, index)

    monkeypatch.setattr(SyntheticShapes, "__getitem__", dies_at_image_6)
    with pytest.raises(KeyboardInterrupt):
        extract(ctx, MODEL, SPEC, SMALL, clip=random_clip)
    monkeypatch.setattr(SyntheticShapes, "__getitem__", lambda self, i: (seen.append(i), original(self, i))[1])
    partial = ActivationCache.open(ctx.layout.activations / reference.path.name)
    assert not partial.complete and partial.n_done == 4  # one committed batch of 4; the 5th image batch died
    seen.clear()
    result = extract(ctx, MODEL, SPEC, SMALL, clip=random_clip)
    assert result.extracted == 6 and seen == list(range(4, 10))
    np.testing.assert_array_equal(result.cache.activations(), reference.activations())
    np.testing.assert_array_equal(result.cache.labels(), reference.labels())



@pytest.mark.slow
def test_embeddings_are_clips_image_embeddings_and_resume_with_the_activations(ctx, tmp_path, random_clip, monkeypatch):
    """The rest of the tower run on the hooked stream gives CLIP's own image embedding; a killed run keeps
    them in step with the activations, and the activations are those of a cache without them."""
    from tests.conftest import make_context
    from clipscope.datasets.synthetic import SyntheticShapes

    plain = extract(make_context(tmp_path / "plain"), MODEL, SPEC, SMALL, clip=random_clip).cache
    assert not plain.has_embeddings and plain.embeddings() is None
    reference = extract(make_context(tmp_path / "ref"), MODEL, SPEC, SMALL, clip=random_clip, embeddings=True).cache
    ds = build_dataset(SPEC, ctx.layout.datasets)
    images = torch.stack([build_transform(preprocess_descriptor(MODEL))(ds[i][0]) for i in range(10)])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(random_clip.model.encode_image(images), dim=-1)
    assert reference.embeddings().dtype == np.float16  # like the activations
    np.testing.assert_allclose(reference.embeddings().astype(np.float32), expected.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(reference.activations(), plain.activations())
    original = SyntheticShapes.__getitem__

    def dies_at_image_6(self, index):
        if index == 6:
            raise KeyboardInterrupt("killed")
        return original(self, index)

    monkeypatch.setattr(SyntheticShapes, "__getitem__", dies_at_image_6)
    with pytest.raises(KeyboardInterrupt):
        extract(ctx, MODEL, SPEC, SMALL, clip=random_clip, embeddings=True)
    monkeypatch.setattr(SyntheticShapes, "__getitem__", original)
    assert ActivationCache.open(ctx.layout.activations / reference.path.name).n_done == 4
    resumed = extract(ctx, MODEL, SPEC, SMALL, clip=random_clip, embeddings=True).cache
    np.testing.assert_array_equal(resumed.embeddings(), reference.embeddings())
    np.testing.assert_array_equal(resumed.activations(), reference.activations())
    with pytest.raises(ValueError, match="write them with the activations"):
        resumed.writer().write(np.zeros((1, 1, 768)), np.zeros(1))


def test_a_failed_write_neither_loses_nor_repeats_a_batch(ctx, tmp_path, random_clip, monkeypatch):
    """The first commit fails (a full disk, say) after its batch was written; a rerun ends equal to an
    uninterrupted extraction, with no batch written twice (one batch is in flight while another is written)."""
    from clipscope.activation_cache import CacheWriter
    from tests.conftest import make_context

    reference = extract(make_context(tmp_path / "ref"), MODEL, SPEC, SMALL, clip=random_clip).cache
    real_commit, calls = CacheWriter.commit, []

    def fails_first(self):
        calls.append(self.position)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real_commit(self)

    monkeypatch.setattr(CacheWriter, "commit", fails_first)
    with pytest.raises(OSError, match="No space"):
        extract(ctx, MODEL, SPEC, SMALL, clip=random_clip)
    assert calls == [4, 4], "the failed commit is retried once on the way out, at the same position"
    monkeypatch.setattr(CacheWriter, "commit", real_commit)
    result = extract(ctx, MODEL, SPEC, SMALL, clip=random_clip)
    assert result.extracted == 6
    np.testing.assert_array_equal(result.cache.activations(), reference.activations())
    np.testing.assert_array_equal(result.cache.labels(), reference.labels())

def test_resizing_on_the_device_fills_a_cache_of_its_own_close_to_pils(ctx, random_clip):
    """Through two decoding workers that hand over raw pixels of mixed sizes, as on a GPU machine."""
    ctx.settings.num_workers = 2
    spec = DatasetSpec(name="imagefolder", root=_folder_of_photos(ctx.layout.datasets / "photos"))
    pil = extract(ctx, MODEL, spec, SMALL, clip=random_clip).cache
    on_device = extract(ctx, MODEL.model_copy(update={"resize": "torch"}), spec, SMALL, clip=random_clip).cache
    assert on_device.path != pil.path and on_device.meta["key"]["preprocess"]["resize"] == "torch"
    a, b = (c.activations().astype(np.float32) for c in (pil, on_device))
    assert list(on_device.labels()) == list(pil.labels())
    relative = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)
    assert relative.max() < 2e-3, relative  # fp16 storage alone rounds at ~5e-4


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_an_image_that_cannot_be_read_stops_extraction_naming_it_and_keeps_the_batches_before(ctx, random_clip, workers, damage):
    ctx.settings.num_workers = workers
    root = _folder_of_photos(ctx.layout.datasets / "photos")  # 7 photos in c0/, c1/; batches of 4
    bad = root / "c1" / "5.jpg"  # the last of the 7 in listing order (c0/ first): in the second batch
    data = bad.read_bytes()
    bad.write_bytes(b"\xff\xd8\xff not a jpeg" if damage == "not an image" else data[: len(data) // 2])
    spec = DatasetSpec(name="imagefolder", root=root)
    with pytest.raises(ClipScopeError, match=rf"^Cannot read {re.escape(str(bad))} \((UnidentifiedImageError|OSError): .+\); remove or repair it, then run again\.$"):
        extract(ctx, MODEL, spec, SMALL, clip=random_clip)
    (cache,) = [ActivationCache.open(p) for p in ctx.layout.activations.iterdir()]
    assert cache.n_done == 4 and not cache.complete  # the first batch was kept


def _folder_of_photos(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(512, 384), (384, 512), (300, 300), (120, 90), (512, 384), (640, 427), (512, 384)]):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8))
        small.resize((w, h), Image.Resampling.BILINEAR).save(root / f"c{i % 2}" / f"{i}.jpg", quality=90)
    return root
