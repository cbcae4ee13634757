import numpy as np
import pytest
import torch

from clipscope.cofiring import FiringTable
from tests.conftest import array_cache


def _table(fires: np.ndarray) -> FiringTable:
    images, features = np.nonzero(fires)
    order = np.random.default_rng(0).permutation(len(images))  # entries in any order
    return FiringTable.from_entries(torch.from_numpy(images[order]), torch.from_numpy(features[order]), *fires.shape)


def test_partners_are_the_features_with_the_most_alike_image_sets():
    rng = np.random.default_rng(1)
    fires = rng.random((200, 40)) < rng.uniform(0.02, 0.5, size=40)  # [images, features], features of many densities
    fires[:, 7] = fires[:, 3] & (rng.random(200) < 0.8)  # 7 fires on most of 3's images and nowhere else
    fires[:, 9] = False  # never fires
    table = _table(fires)
    for f in (3, 7, 12):
        found = table.partners(f, k=5)
        a = fires[:, f]
        together = (fires & a[:, None]).sum(0)
        jaccard = together / (a.sum() + fires.sum(0) - together)
        jaccard[f] = -1
        best = sorted(range(40), key=lambda g: (-jaccard[g], -together[g], g))[:5]
        assert [p["index"] for p in found] == [g for g in best if together[g] > 0]
        for p in found:
            g = p["index"]
            assert p["together"] == together[g] and p["jaccard"] == pytest.approx(jaccard[g])
            assert p["of_this"] == pytest.approx(together[g] / a.sum()) and p["of_that"] == pytest.approx(together[g] / fires[:, g].sum())
        assert table.fires_on(f) == a.sum()
    assert table.partners(3, k=1)[0]["index"] == 7 and table.partners(7, k=1)[0]["of_this"] == 1.0
    assert table.partners(9) == [] and table.fires_on(9) == 0


def test_the_table_of_a_cache_is_the_sae_s_firing_per_image(tmp_path):
    """Over several tokens an image fires a feature where any of its tokens does."""
    from clipscope.sae.model import TopKSAE
    from clipscope.token_maps import per_image_entries

    sae = TopKSAE(16, 64, 4)
    sae.init_weights("tied", generator=torch.Generator().manual_seed(0))
    acts = torch.randn(30, 3, 16, generator=torch.Generator().manual_seed(1))
    cache = array_cache(tmp_path, acts.numpy(), tokens="all")
    table = FiringTable.from_cache(sae, cache, batch=7)
    x = torch.from_numpy(cache.activations()[:].astype(np.float32)).reshape(-1, 16)
    code = sae.encode(x)
    img, feat, _ = per_image_entries(code.indices, code.values, torch.arange(30), 3, 64)
    fires = np.zeros((30, 64), dtype=bool)
    fires[img.numpy(), feat.numpy()] = True
    for f in range(64):
        assert table.fires_on(f) == fires[:, f].sum()
    assert table.partners(int(feat[0]), k=64) == _table(fires).partners(int(feat[0]), k=64)
    assert FiringTable.from_cache(sae, cache, limit=10).n_images == 10
