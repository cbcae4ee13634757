from pathlib import Path

import pytest

from clipscope.config import RunConfig, apply_overrides, load_config, parse_config
from clipscope.errors import ClipScopeError
from worker.train.data import EpochOrder

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert isinstance(load_config(path), RunConfig)


def test_seed_config_is_the_study_to_the_letter():
    cfg = load_config(CONFIGS / "seed.toml")
    assert (cfg.model.name, cfg.model.pretrained, cfg.model.layer, cfg.model.tokens) == ("ViT-B-32", "laion2b_s34b_b79k", 10, "cls")
    assert (cfg.data.name, cfg.data.split, cfg.data.subsample, cfg.data.limit) == ("food101", "train", None, None)
    assert (cfg.sae.d_sae, cfg.sae.k, cfg.use_b_dec) == (49152, 500, False)
    t = cfg.train
    assert (t.recipe, t.epochs, t.batch_size, t.l1_start, t.l1_end, t.l1_warmup_steps) == ("seed", 15, 64, 1e-6, 0.01, 12000)
    assert t.eval_data is not None and t.eval_data.split == "test"  # all 75,750 training images train
    assert EpochOrder(75_750, t.batch_size, t.epochs, 0, "cpu").total_steps == 17_760


def test_unknown_keys_and_bad_values_are_errors_naming_the_key():
    with pytest.raises(ClipScopeError, match="sae.kk"):
        parse_config({"sae": {"kk": 3}})
    with pytest.raises(ClipScopeError, match="exceeds d_sae"):
        parse_config({"sae": {"d_sae": 4, "k": 5}})
    with pytest.raises(ClipScopeError, match="model.tokens"):
        parse_config({"model": {"tokens": "every"}})
    with pytest.raises(ClipScopeError, match="imagefolder"):
        parse_config({"data": {"name": "imagefolder"}})


def test_the_hook_site_is_checked_against_open_clips_architecture_table_before_any_stage():
    with pytest.raises(ClipScopeError, match=r"model: layer 12 is outside 0\.\.11, the blocks of ViT-B-32\.$"):
        parse_config({"model": {"layer": 12}})
    with pytest.raises(ClipScopeError, match="'ViT-B-99' is not an open_clip architecture"):
        parse_config({"model": {"name": "ViT-B-99"}})
    with pytest.raises(ClipScopeError, match="'RN50' is not a vision transformer"):
        parse_config({"model": {"name": "RN50"}})
    assert parse_config({"model": {"name": "ViT-L-14", "layer": 23}}).model.layer == 23  # its 24 blocks, not B/32's 12
    assert parse_config({"model": {"layer": 0}}).model.layer == 0


def test_a_vocabulary_file_that_is_not_there_is_refused_when_the_config_is_read(tmp_path):
    missing = tmp_path / "concepts.txt"
    with pytest.raises(ClipScopeError, match=rf"precompute.names: vocabulary file {missing} does not exist"):
        parse_config({"precompute": {"names": {"vocabulary": str(missing)}}})
    assert parse_config({"precompute": {"names": {"vocabulary": str(missing), "enabled": False}}})  # not used: not needed
    missing.write_text("stripes\n")
    assert parse_config({"precompute": {"names": {"vocabulary": str(missing)}}}).precompute.names.vocabulary == str(missing)


def test_what_would_fail_after_training_fails_when_the_config_is_read():
    with pytest.raises(ClipScopeError, match="train: no held-out data: set holdout_fraction > 0 or eval_data"):
        parse_config({"train": {"holdout_fraction": 0}})
    assert parse_config({"train": {"holdout_fraction": 0, "eval_data": {"name": "synthetic", "split": "test"}}})
    with pytest.raises(ClipScopeError, match="evaluate.templates"):
        parse_config({"evaluate": {"templates": "imagenet_80"}})  # a typo of a set's name
    with pytest.raises(ClipScopeError, match="every prompt template needs a '{}'"):
        parse_config({"evaluate": {"templates": ["a photo of a dog."]}})
    assert parse_config({"evaluate": {"templates": "openai_imagenet"}}).evaluate.templates == "openai_imagenet"
    assert parse_config({"evaluate": {"templates": ["a photo of {}."]}}).evaluate.templates == ["a photo of {}."]


def test_missing_or_broken_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ClipScopeError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("name = ")
    with pytest.raises(ClipScopeError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_b_dec_defaults_follow_the_recipe():
    assert parse_config({"train": {"recipe": "seed"}}).use_b_dec is False
    assert parse_config({"train": {"recipe": "topk"}}).use_b_dec is True
    assert parse_config({"train": {"recipe": "seed"}, "sae": {"use_b_dec": True}}).use_b_dec is True


@pytest.mark.parametrize(("cores", "workers"), [(1, 1), (2, 1), (16, 15), (64, 16)])
def test_auto_decoding_workers_follow_the_cores_this_process_may_use(monkeypatch, cores, workers):
    import os

    from clipscope.settings import Settings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert Settings(num_workers="auto").resolved_num_workers == workers
    monkeypatch.delattr(os, "sched_getaffinity")  # as on macOS
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert Settings(num_workers="auto").resolved_num_workers == workers
    assert Settings(num_workers=3).resolved_num_workers == 3
    monkeypatch.setenv("CLIPSCOPE_NUM_WORKERS", "-1")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Settings()


def test_set_overrides_keys_by_dotted_path_with_toml_values_or_else_text():
    raw = {"sae": {"k": 500}, "evaluate": {"datasets": [{"name": "cifar10"}]}}
    got = apply_overrides(raw, ["sae.k=64", "train.lr=1e-3", "data.root=/data/food", "model.pretrained=none",
                                'evaluate.templates=["a {}."]', "train.b_dec_init = mean", "sae.k=32"])
    assert got == {"sae": {"k": 32}, "evaluate": {"datasets": [{"name": "cifar10"}], "templates": ["a {}."]}, "train": {"lr": 0.001, "b_dec_init": "mean"},
                   "data": {"root": "/data/food"}, "model": {"pretrained": "none"}}, "typed where TOML reads it, text where not; the last one wins"
    assert raw == {"sae": {"k": 500}, "evaluate": {"datasets": [{"name": "cifar10"}]}}, "the file's table is left as it was"
    for bad, says in (("sae.k", "is not KEY=VALUE"), ("sae..k=1", "is not KEY=VALUE"), ("evaluate.datasets.0.name=x", "evaluate.datasets is not a table; set it whole"),
                      ("sae.k.x=1", "sae.k is not a table")):
        with pytest.raises(ClipScopeError, match=says):
            apply_overrides(raw, [bad])


def test_a_config_read_with_overrides_is_validated_and_named_with_them():
    path = CONFIGS / "seed.toml"
    cfg = load_config(path, ["sae.k=64", "train.epochs=1", "name=seed-k64"])
    assert (cfg.sae.k, cfg.train.epochs, cfg.name, cfg.sae.d_sae) == (64, 1, "seed-k64", load_config(path).sae.d_sae)
    with pytest.raises(ClipScopeError, match=r"Config .*seed\.toml --set sae\.kk=3 is invalid: sae\.kk: "):
        load_config(path, ["sae.kk=3"])
    with pytest.raises(ClipScopeError, match=r"--set sae\.k=many is invalid: sae\.k: "):
        load_config(path, ["sae.k=many"])
