"""Token maps: per-image entries over several tokens (clipscope.token_maps), their patch layout, bytes and veils (clipscope.veils)."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from clipscope.token_maps import occlusions, per_image_entries, quantise
from clipscope.veils import VEIL_ALPHA, PatchGrid, fractions, patch_grid, relative_drops, veil_data_uri


def test_an_images_activation_is_its_maximum_over_tokens():
    indices = torch.tensor([[0, 1], [1, 2], [0, 2], [3, 1]])  # 2 images x 2 tokens, k = 2
    values = torch.tensor([[1.0, 2.0], [5.0, 0.0], [0.5, 0.25], [0.0, 0.0]])
    img, feat, val = per_image_entries(indices, values, torch.tensor([10, 11]), 2, 4)
    got = sorted(zip(img.tolist(), feat.tolist(), val.tolist()))
    assert got == [(10, 0, 1.0), (10, 1, 5.0), (11, 0, 0.5), (11, 2, 0.25)]


def test_each_entry_keeps_its_activation_on_every_token():
    indices = torch.tensor([[0, 1], [1, 2], [0, 2], [3, 1], [2, 0], [0, 3]])  # 2 images x 3 tokens, k = 2
    values = torch.tensor([[1.0, 2.0], [5.0, 0.0], [0.5, 0.25], [0.0, 0.0], [3.0, 0.0], [0.75, 0.125]])
    img, feat, val, tokens = per_image_entries(indices, values, torch.tensor([10, 11]), 3, 4, maps=True)
    maps = tokens.maps()
    got = {(i, f): (v, m) for i, f, v, m in zip(img.tolist(), feat.tolist(), val.tolist(), maps.tolist())}
    assert got == {
        (10, 0): (1.0, [1.0, 0.0, 0.5]), (10, 1): (5.0, [2.0, 5.0, 0.0]), (10, 2): (0.25, [0.0, 0.0, 0.25]),
        (11, 0): (0.75, [0.0, 0.0, 0.75]), (11, 2): (3.0, [0.0, 3.0, 0.0]), (11, 3): (0.125, [0.0, 0.0, 0.125]),
    }
    some = torch.tensor([False, True, False, True, True, False])
    assert tokens.maps(some).tolist() == maps[some].tolist(), "the maps of some entries, built alone"
    assert per_image_entries(indices[:2], values[:2], torch.tensor([7]), 1, 4, maps=True)[3].maps().tolist() == [[1.0], [2.0], [5.0]]


@pytest.mark.parametrize(("tokens", "n", "grid"), [
    ("patches", 49, PatchGrid(7, 0)), ("all", 50, PatchGrid(7, 1)), ("cls", 1, None), ("patches", 48, None), ("all", 49, None), ("patches", 0, None),
])
def test_a_token_map_is_laid_out_as_a_square_of_patches_after_cls(tokens, n, grid):
    assert patch_grid(tokens, n) == grid


def test_quantised_maps_are_fractions_of_the_images_activation():
    maps = torch.tensor([[0.0, 1.0, 4.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    q = quantise(maps, torch.tensor([4.0, 0.0]))
    assert q.dtype == torch.uint8 and q.tolist() == [[0, 64, 255, 128], [0, 0, 0, 0]]
    assert fractions(q[0].numpy().tobytes()) == [0.0, 64 / 255, 1.0, 128 / 255]


def test_the_veil_is_clear_where_the_feature_fires_most_and_skips_cls():
    cls_then_patches = [0.5, 1.0, 0.0, 0.25, 0.5]  # "all": CLS, then 2 x 2 patches in row-major order
    uri = veil_data_uri(cls_then_patches, "all")
    veil = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGBA"))
    assert veil[..., 3].tolist() == [[0, VEIL_ALPHA], [round(0.75 * VEIL_ALPHA), round(0.5 * VEIL_ALPHA)]]
    assert veil_data_uri([1.0], "cls") is None


def test_each_occlusion_greys_out_one_patch_in_row_major_order():
    image = torch.arange(3 * 4 * 6, dtype=torch.float32).view(3, 4, 6) + 1  # 2 x 3 patches of 2 x 2
    copies = occlusions(image, (2, 2))
    assert copies.shape == (6, 3, 4, 6)
    for p in range(6):
        r, c = divmod(p, 3)
        zeroed = copies[p] == 0
        assert zeroed[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].all() and int(zeroed.sum()) == 3 * 4
    assert torch.equal(image, torch.arange(3 * 4 * 6, dtype=torch.float32).view(3, 4, 6) + 1), "the input is left alone"


def test_occlusion_drops_are_shown_relative_to_the_largest_and_rises_as_none():
    assert relative_drops([0.5, -0.2, 0.25, 0.0]) == [1.0, 0.0, 0.5, 0.0]
    assert relative_drops([-0.1, 0.0]) == [0.0, 0.0]
