import pytest
import torch

from clipscope.clip.loading import load_clip
from clipscope.config import ModelConfig
from clipscope.errors import ClipScopeError


def test_random_weights_only_when_asked_and_recorded_as_such():
    a = load_clip(ModelConfig(pretrained="none", init_seed=1))
    b = load_clip(ModelConfig(pretrained="none", init_seed=1))
    c = load_clip(ModelConfig(pretrained="none", init_seed=2))
    assert a.provenance == {"model": "ViT-B-32", "random_init": True, "source": "random", "init_seed": 1}
    w = lambda m: m.visual.conv1.weight  # noqa: E731
    assert torch.equal(w(a.model), w(b.model)) and not torch.equal(w(a.model), w(c.model))


def test_local_weights_file_is_loaded_and_hashed(tmp_path, random_clip):
    path = tmp_path / "weights.pt"
    torch.save(random_clip.model.state_dict(), path)
    loaded = load_clip(ModelConfig(weights_file=path))
    assert loaded.provenance["source"] == "file" and len(loaded.provenance["sha256"]) == 64
    assert torch.equal(loaded.visual.conv1.weight, random_clip.visual.conv1.weight)


def test_missing_weights_file_and_unknown_tag_fail_clearly(tmp_path):
    with pytest.raises(ClipScopeError, match="does not exist"):
        load_clip(ModelConfig(weights_file=tmp_path / "missing.bin"))
    with pytest.raises(ClipScopeError, match="Unknown pretrained tag 'no_such_tag'.*laion2b_s34b_b79k"):
        load_clip(ModelConfig(pretrained="no_such_tag"))


def test_an_impossible_download_fails_with_one_sentence_naming_the_local_file_option(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipScopeError, match=r"model\.weights_file") as info:
        load_clip(ModelConfig(pretrained="laion2b_s34b_b79k"), cache_dir=tmp_path)
    assert "Could not download the open_clip weights ViT-B-32/laion2b_s34b_b79k" in str(info.value)
