import numpy as np
import pytest
import torch
from sqlalchemy import select

from clipscope.config import parse_config
from clipscope.db.models import Sae, SaeStatus, TrainingPoint
from clipscope.db.session import session_scope
from clipscope.sae.io import load_sae
from clipscope.sae.model import TopKSAE
from tests.conftest import array_cache, make_context
from worker.train.checkpoint import checkpoint_dirs
from worker.train.loop import train
from worker.train.recipes import SeedRecipe


def planted_data(n=20000, d=32, n_atoms=64, active=4, noise=0.01, seed=0):
    """Sparse non-negative combinations of known unit atoms, plus noise."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.stack([rng.choice(n_atoms, active, replace=False) for _ in range(n)])
    coef = rng.uniform(0.5, 2.0, size=(n, active))
    x = np.einsum("ns,nsd->nd", coef, atoms[idx]) + rng.normal(0, noise, size=(n, d))
    return x, atoms


def small_config(recipe="topk", **train):
    return parse_config(
        {
            "name": "t",
            "sae": {"d_sae": 128, "k": 4},
            "train": {"recipe": recipe, "epochs": 1, "batch_size": 64, "log_every": 5, "eval_every": 10, **train},
        }
    )


@pytest.fixture
def data_cache(ctx):
    x, _ = planted_data(n=800)
    return array_cache(ctx.layout.activations, x)


def test_topk_recipe_recovers_a_planted_dictionary(ctx):
    x, atoms = planted_data()
    cache = array_cache(ctx.layout.activations, x)
    cfg = small_config(epochs=15, batch_size=256, log_every=1000, eval_every=1000)
    result = train(ctx, cfg, cache)
    sae, _ = load_sae(result.sae_dir)
    cos = torch.tensor(atoms, dtype=torch.float32) @ sae.W_dec.detach().T
    recovered = (cos.max(dim=1).values >= 0.9).float().mean().item()
    assert recovered >= 0.9, f"only {recovered:.0%} of the planted atoms recovered"
    assert result.metrics["evr"] > 0.8


def _checkpoint_saes(run_dir):
    return [(step, load_sae(path)[0]) for step, path in checkpoint_dirs(run_dir)]


def test_seed_recipe_changes_the_decoder_only_by_renormalisation(ctx, data_cache):
    cfg = small_config("seed", checkpoint_every=1, keep_checkpoints=100)
    result = train(ctx, cfg, data_cache, stop_after=6)
    initial = TopKSAE(32, 128, 4, use_b_dec=False)
    SeedRecipe(cfg.train, 13, 32, 128).initialise(initial, torch.zeros(1, 32))
    saved = _checkpoint_saes(result.sae_dir.parent)
    assert [step for step, _ in saved] == [1, 2, 3, 4, 5, 6]
    for step, sae in saved:
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128), msg=f"step {step}")
        torch.testing.assert_close(sae.W_dec, initial.W_dec, rtol=0, atol=1e-6, msg=f"step {step}")
        assert torch.count_nonzero(sae.b_dec) == 0
    assert not torch.allclose(saved[-1][1].W_enc, initial.W_enc), "the encoder must train"


def test_topk_recipe_trains_the_decoder_and_keeps_it_unit_norm_every_step(ctx, data_cache):
    cfg = small_config("topk", checkpoint_every=1, keep_checkpoints=100)
    result = train(ctx, cfg, data_cache, stop_after=6)
    saved = _checkpoint_saes(result.sae_dir.parent)
    assert len(saved) == 6
    for step, sae in saved:
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128), msg=f"step {step}")
    assert not torch.allclose(saved[0][1].W_dec, saved[-1][1].W_dec)
    x = torch.tensor(np.asarray(data_cache.activations()[:, 0], dtype=np.float32))
    torch.testing.assert_close(saved[0][1].b_dec, x.mean(0), atol=0.05, rtol=0)  # initialised at the data mean


def test_seed_l1_coefficient_warms_up_linearly():
    cfg = small_config("seed", l1_start=1e-6, l1_end=0.01, l1_warmup_steps=12000)
    recipe = SeedRecipe(cfg.train, 17760, 768, 49152)
    assert recipe.l1_coefficient(0) == pytest.approx(1e-6)
    assert recipe.l1_coefficient(6000) == pytest.approx((1e-6 + 0.01) / 2)
    assert recipe.l1_coefficient(12000) == recipe.l1_coefficient(17000) == pytest.approx(0.01)


def _curve(url, key):
    with session_scope(url) as s:
        sae = s.scalar(select(Sae).where(Sae.key == key))
        points = s.scalars(select(TrainingPoint).where(TrainingPoint.sae_id == sae.id).order_by(TrainingPoint.step)).all()
        return sae.status, sae.metrics, [(p.step, p.loss, p.mse, p.train_evr, p.l0, p.dead_fraction, p.heldout_evr) for p in points]


@pytest.mark.parametrize("recipe", ["seed", "topk"])
def test_a_killed_run_resumes_to_the_same_weights_and_curve(tmp_path, recipe):
    x, _ = planted_data(n=800)
    cfg = small_config(recipe, epochs=2, checkpoint_every=5)
    ref_ctx, ctx = make_context(tmp_path / "ref"), make_context(tmp_path / "run")
    reference = train(ref_ctx, cfg, array_cache(ref_ctx.layout.activations, x))
    cache = array_cache(ctx.layout.activations, x)
    killed = train(ctx, cfg, cache, stop_after=13)  # dies between checkpoints 10 and 15
    assert killed.trained_steps == 13 and not (killed.sae_dir / "cfg.json").exists()
    status, _, partial_curve = _curve(ctx.database_url, killed.sae_key)
    assert status == SaeStatus.TRAINING and partial_curve[-1][0] == 10
    resumed = train(ctx, cfg, cache)
    assert reference.metrics["steps"] == 24  # 760 training vectors (5 % held out) / 64 = 12 steps x 2 epochs
    assert resumed.trained_steps == 24 - 10
    ref_sae, _ = load_sae(reference.sae_dir)
    sae, _ = load_sae(resumed.sae_dir)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(ref_sae, name)), name
    assert _curve(ctx.database_url, resumed.sae_key)[2] == _curve(ref_ctx.database_url, reference.sae_key)[2]
    assert checkpoint_dirs(resumed.sae_dir.parent) == []  # cleaned up once the SAE is final


def test_finished_training_records_metrics_and_curve_and_is_reused(ctx, data_cache):
    cfg = small_config("topk", epochs=2)
    first = train(ctx, cfg, data_cache)
    status, metrics, curve = _curve(ctx.database_url, first.sae_key)
    assert status == SaeStatus.TRAINED
    assert set(metrics) >= {"evr", "mse", "l0", "dead_fraction"} and metrics["l0"] <= 4
    assert [p[0] for p in curve] == [5, 10, 15, 20, 24]
    assert [p[0] for p in curve if p[-1] is not None] == [10, 20, 24]  # held-out EVR at eval steps and the end
    _, meta = load_sae(first.sae_dir)
    assert meta["metrics"]["evr"] == pytest.approx(metrics["evr"]) and meta["recipe"] == "topk"
    again = train(ctx, cfg, data_cache)
    assert again.trained_steps == 0 and again.sae_key == first.sae_key


@pytest.mark.parametrize("every", [{"log_every": 5}, {"log_every": 1000, "checkpoint_every": 3}])
def test_a_diverged_run_stops_with_a_sentence_before_any_checkpoint_holds_nan(ctx, every):
    from clipscope.errors import ClipScopeError

    x, _ = planted_data(n=800)
    x[123] = np.nan  # one vector the extraction should never have written
    cfg = small_config("topk", epochs=2, b_dec_init="zeros", keep_checkpoints=100, **every)
    with pytest.raises(ClipScopeError, match=r"^Training diverged: the mean loss of steps \d+\.\.\d+ is nan\. No checkpoint holds those steps"):
        train(ctx, cfg, array_cache(ctx.layout.activations, x))
    with session_scope(ctx.database_url) as s:
        assert s.scalar(select(Sae.status)) != SaeStatus.TRAINED
    for run_dir in ctx.layout.saes.glob("*"):  # only checkpoints from before the divergence, if any
        for _, sae in _checkpoint_saes(run_dir):
            assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_held_out_images_never_train(ctx):
    from worker.train.data import split_images

    train_rows, held = split_images(100, 0.1, seed=0)
    assert len(held) == 10 and len(train_rows) == 90
    assert not set(train_rows) & set(held)
    assert list(split_images(100, 0.1, seed=0)[1]) == list(held)


def test_topk_recipe_removes_the_parallel_decoder_gradient_before_the_step():
    from clipscope.config import TrainConfig
    from clipscope.sae.metrics import FiringTracker
    from worker.train.recipes import make_recipe

    sae = TopKSAE(32, 128, 4, use_b_dec=True)
    sae.init_weights("tied", generator=torch.Generator().manual_seed(0))
    recipe = make_recipe(TrainConfig(recipe="topk"), 100, 32, 128)
    recipe.prepare(sae)
    x = torch.tensor(planted_data(n=64)[0], dtype=torch.float32)
    recipe.loss(sae, x, 0, FiringTracker(128, 10**6)).loss.backward()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert parallel.abs().max() > 1e-4, "the raw gradient has a parallel part to remove"
    recipe.before_step(sae)
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(dim=1), torch.zeros(128), atol=1e-6, rtol=0)


def test_the_time_training_waits_for_checkpoints_is_reported(ctx, data_cache, monkeypatch):
    """A checkpoint is written in the background; when the disk is slower than the steps between two
    checkpoints, the next one waits for it, and that wait is in the metrics (``checkpoint_seconds``)."""
    import time

    from worker.train import checkpoint

    real_write = checkpoint._write
    monkeypatch.setattr(checkpoint, "_write", lambda *a: (time.sleep(0.5), real_write(*a)))
    result = train(ctx, small_config("seed", checkpoint_every=3), data_cache)  # 12 steps: checkpoints at 3, 6, 9
    assert 0.6 <= result.metrics["checkpoint_seconds"] <= result.metrics["train_seconds"]
