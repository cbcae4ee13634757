"""The two ways to preprocess images: open_clip's PIL transform, and torchvision on the compute device."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipscope.clip.preprocess import ImagePreprocess, build_transform, preprocess_descriptor
from clipscope.config import ModelConfig
from clipscope.errors import ClipScopeError

PIL_CFG = ModelConfig(pretrained="none")
TORCH_CFG = ModelConfig(pretrained="none", resize="torch")
LEVEL = 1 / 255 / min(preprocess_descriptor(PIL_CFG)["std"])  # one uint8 step, in normalised units


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields with sharp edges: what a resize filter treats differently if it can."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8))
    img = np.asarray(small.resize((width, height), Image.Resampling.BILINEAR)).copy()
    img[height // 3 : height // 2, :, 0] = 255  # an edge and a flat saturated band
    return Image.fromarray(img)


def test_the_torch_resize_gives_the_pil_model_input_within_one_pixel_level_in_order():
    """Landscape, portrait, square, smaller than the crop (upscaled), and equal sizes batched together."""
    images = [photo(w, h, i) for i, (w, h) in enumerate([(512, 384), (384, 512), (300, 300), (120, 90), (512, 384), (640, 427)])]
    expected = torch.stack([build_transform(preprocess_descriptor(PIL_CFG))(img) for img in images])
    got = ImagePreprocess(preprocess_descriptor(TORCH_CFG))(images)
    assert got.shape == expected.shape == (6, 3, 224, 224) and got.dtype == torch.float32
    levels = (got - expected).abs() / LEVEL
    assert float(levels.max()) <= 2.001, "at most two uint8 levels from PIL's (where PIL clips a bicubic overshoot between its passes)"
    assert float((levels > 0.01).float().mean()) < 0.05, "95 % of values equal"
    assert float((levels > 1.01).float().mean()) < 1e-3, "two levels: a handful of pixels"
    per_image = levels.flatten(1).mean(1)
    assert float(per_image.max()) < 0.05, per_image  # a mix-up of images would be far larger



@pytest.mark.parametrize("cfg", [PIL_CFG, TORCH_CFG], ids=["pil", "torch"])
def test_the_model_input_turns_back_into_the_resized_and_cropped_image(cfg):
    images = [photo(512, 384, 0), photo(300, 420, 1)]
    pil_steps = build_transform(preprocess_descriptor(PIL_CFG)).transforms[:-2]  # resize, crop, RGB; not ToTensor, Normalize
    expected = [np.asarray(img).astype(int) for img in (apply_steps(pil_steps, image) for image in images)]
    pre = ImagePreprocess(preprocess_descriptor(cfg))
    views = pre.pixels(pre(images))
    assert [v.size for v in views] == [(224, 224)] * 2 and all(v.mode == "RGB" for v in views)
    for view, want in zip(views, expected):
        assert np.abs(np.asarray(view).astype(int) - want).max() <= (0 if cfg is PIL_CFG else 2)


@pytest.mark.parametrize("cfg", [PIL_CFG, TORCH_CFG], ids=["pil", "torch"])
def test_what_the_model_saw_preprocesses_into_the_same_model_input(cfg):
    """The explorer keeps an analysed image as CLIP saw it and analyses that again: exact, because the
    model input lies on the uint8 grid and an image of the model's size is neither resized nor cropped."""
    pre = ImagePreprocess(preprocess_descriptor(cfg))
    first = pre([photo(512, 384, 0), photo(300, 420, 1), photo(120, 90, 2)])
    assert torch.equal(pre(pre.pixels(first)), first)


def apply_steps(steps, image: Image.Image) -> Image.Image:
    for step in steps:
        image = step(image)
    return image

def test_pil_preprocessing_runs_in_the_workers_and_the_torch_one_hands_over_pixels():
    img = photo(512, 384, 0)
    pil, tv = ImagePreprocess(preprocess_descriptor(PIL_CFG)), ImagePreprocess(preprocess_descriptor(TORCH_CFG))
    assert pil.host(img).shape == (3, 224, 224) and pil.host(img).dtype == torch.float32
    pixels = tv.host(img)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 384, 512)
    assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(np.array(img)))
    images, labels = tv.collate([(pixels, 3), (tv.host(photo(100, 80, 1)), -1)])
    assert isinstance(images, list) and labels.tolist() == [3, -1]


def test_the_torch_resize_has_a_descriptor_and_so_a_cache_of_its_own():
    pil, tv = preprocess_descriptor(PIL_CFG), preprocess_descriptor(TORCH_CFG)
    assert "resize" not in pil, "the PIL descriptor keeps its older form: existing caches keep their names"
    assert tv == {**pil, "resize": "torch"}


def test_a_resize_mode_the_torch_path_does_not_implement_is_a_clear_error():
    descriptor = {**preprocess_descriptor(TORCH_CFG), "resize_mode": "longest"}
    with pytest.raises(ClipScopeError, match="resize = 'pil'"):
        ImagePreprocess(descriptor)


def test_the_device_share_never_reads_a_value_back_to_the_host():
    """On the meta device tensors have no values: any read back to the host (a GPU stall) would raise."""
    images = [torch.empty(3, h, w, dtype=torch.uint8, device="meta") for h, w in [(384, 512), (300, 300), (384, 512)]]
    out = ImagePreprocess(preprocess_descriptor(TORCH_CFG)).to_device(images, "meta")
    assert out.shape == (3, 3, 224, 224) and out.device.type == "meta"
