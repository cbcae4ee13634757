import json

import pytest
import torch

from clipscope.errors import ClipScopeError
from clipscope.sae.io import load_sae, save_sae
from clipscope.sae.model import TopKSAE


def test_save_load_roundtrip_in_sae_lens_layout(tmp_path):
    sae = TopKSAE(12, 40, 4, use_b_dec=True)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    meta = {"model": "ViT-B-32", "pretrained": "none", "random_weights": True, "layer": 10, "tokens": "cls"}
    save_sae(sae, tmp_path / "sae", meta)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == 12 and cfg["d_sae"] == 40
    assert cfg["activation_fn_kwargs"] == {"k": 4}
    assert cfg["hook_name"] == "blocks.10.hook_resid_post"
    assert cfg["clipscope"]["random_weights"] is True
    loaded, loaded_meta = load_sae(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    assert loaded_meta["layer"] == 10
    from safetensors.torch import load_file

    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "sae" / "sae_weights.safetensors")).items()}
    assert shapes == {"W_enc": (12, 40), "b_enc": (40,), "W_dec": (40, 12), "b_dec": (12,)}


def test_save_replaces_the_folder_whole_and_leaves_no_temporaries(tmp_path):
    first, second = TopKSAE(4, 8, 2), TopKSAE(4, 8, 2)
    save_sae(first, tmp_path / "sae", {"layer": 1})
    save_sae(second, tmp_path / "sae", {"layer": 2})
    loaded, meta = load_sae(tmp_path / "sae")
    assert meta["layer"] == 2 and torch.equal(loaded.W_enc, second.W_enc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_loading_a_folder_that_is_not_an_sae_says_so(tmp_path):
    with pytest.raises(ClipScopeError, match="not an SAE folder"):
        load_sae(tmp_path)


def test_a_damaged_json_file_is_named_with_the_way_out(tmp_path):
    import numpy as np

    from tests.conftest import array_cache

    save_sae(TopKSAE(12, 40, 4, use_b_dec=True), tmp_path / "sae", {"layer": 10})
    (tmp_path / "sae" / "cfg.json").write_text('{"d_in": 12, "d_sae"')  # cut short
    with pytest.raises(ClipScopeError, match=r"sae/cfg\.json is not valid JSON \(.+\): ClipScope writes it whole.* or remove .*sae and run"):
        load_sae(tmp_path / "sae")
    cache = array_cache(tmp_path / "activations", np.zeros((4, 12), dtype=np.float32))
    (cache.path / "metadata.json").write_bytes(b"\xff\xfe")  # not even text
    with pytest.raises(ClipScopeError, match="metadata.json is not valid JSON"):
        type(cache).open(cache.path)
