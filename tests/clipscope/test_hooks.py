import pytest
import torch

from clipscope.clip.hooks import continue_from, residual_at, token_slice


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layer", [0, 10, 11])
def test_hooked_residual_equals_a_forward_hook_in_the_full_forward(random_clip, images, layer):
    captured = {}
    block = random_clip.visual.transformer.resblocks[layer]
    handle = block.register_forward_hook(lambda _m, _i, out: captured.setdefault("out", out.detach()))
    try:
        with torch.no_grad():
            full = random_clip.model.encode_image(images)
    finally:
        handle.remove()
    with torch.no_grad():
        ours = residual_at(random_clip.visual, images, layer)
    assert ours.shape == (3, 50, 768)
    torch.testing.assert_close(ours, captured["out"], rtol=0, atol=0)
    with torch.no_grad():
        resumed = continue_from(random_clip.visual, ours, layer)
    torch.testing.assert_close(resumed, full, rtol=1e-5, atol=1e-5)


def test_forward_stops_after_the_hooked_block(random_clip, images):
    calls = []
    handles = [
        b.register_forward_hook(lambda _m, _i, _o, i=i: calls.append(i))
        for i, b in enumerate(random_clip.visual.transformer.resblocks)
    ]
    try:
        with torch.no_grad():
            residual_at(random_clip.visual, images[:1], 4)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1, 2, 3, 4]


def test_layer_out_of_range_is_rejected(random_clip, images):
    with pytest.raises(ValueError, match="outside 0..11"):
        residual_at(random_clip.visual, images[:1], 12)


def test_token_modes_select_cls_patches_or_all():
    x = torch.arange(50).view(1, 50, 1)
    assert x[:, token_slice("cls")].flatten().tolist() == [0]
    assert x[:, token_slice("patches")].flatten().tolist() == list(range(1, 50))
    assert x[:, token_slice("all")].shape[1] == 50
