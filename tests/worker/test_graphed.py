"""The CUDA-graph training step, with the graph replaced by a stand-in that runs on the CPU.

What a real graph does that the stand-in cannot is run no Python on replay; the stand-in checks
the consequence instead: nothing that changes from step to step may be computed inside the
captured work (the recipe's step scalars, the learning rate), since a replay would repeat the
captured values.
"""

import pytest
import torch

from clipscope.config import TrainConfig
from clipscope.sae.metrics import FiringTracker
from clipscope.sae.model import TopKSAE
from worker.train.graphed import GraphedStep, portable_optimizer_state
from worker.train.recipes import make_recipe
from worker.train.step import adam, train_step

D_IN, D_SAE, K, BATCH = 24, 96, 6, 16


class StandInGraph:
    """Capture runs the step once (as the warm-up runs do; a real capture runs nothing); a replay runs it
    again with step-dependent Python forbidden, and writes the results into the captured outputs, as a
    replay writes the captured memory."""

    def __init__(self):
        self.replays, self.in_replay = 0, False

    def capture(self, fn):
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self):
        self.in_replay = True
        try:
            fresh = self.fn()
        finally:
            self.in_replay = False
        for name in ("loss", "mse", "x_hat"):
            getattr(self.out, name).copy_(getattr(fresh, name))
        self.out.code.indices.copy_(fresh.code.indices)
        self.out.code.values.copy_(fresh.code.values)
        for name, value in fresh.extra.items():
            self.out.extra[name].copy_(value)
        self.replays += 1


def setup(recipe_name: str, capturable: bool):
    sae = TopKSAE(D_IN, D_SAE, K, use_b_dec=recipe_name == "topk")
    recipe = make_recipe(TrainConfig(recipe=recipe_name, l1_warmup_steps=5, lr_warmup_steps=3), 12, D_IN, D_SAE)
    recipe.initialise(sae, torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0)))
    recipe.prepare(sae)
    tracker = FiringTracker(D_SAE, dead_after=40)
    return sae, recipe, adam(recipe.parameters(sae), recipe.lr_at(0), capturable=capturable), tracker


@pytest.mark.parametrize("recipe_name", ["seed", "topk"])
def test_a_graphed_run_trains_exactly_as_the_eager_step(recipe_name, monkeypatch):
    """Learning-rate warm-up (topk) and L1 warm-up (seed) change every step; an epoch's short batch
    (7 rows) and the first step run eagerly between replays."""
    eager = setup(recipe_name, capturable=False)
    graphed_parts = setup(recipe_name, capturable=True)
    stand_in = StandInGraph()
    graphed = GraphedStep(*graphed_parts, batch_size=BATCH, graph=stand_in)
    recipe = graphed_parts[1]
    real_scalars = type(recipe).step_scalars

    def step_scalars(self, step):
        assert not stand_in.in_replay, "a step scalar computed inside the captured step would be replayed as captured"
        return real_scalars(self, step)

    monkeypatch.setattr(type(recipe), "step_scalars", step_scalars)
    sizes = [BATCH, BATCH, BATCH, BATCH, 7, BATCH, BATCH, BATCH]
    kept = {}
    for step, size in enumerate(sizes):
        x = torch.randn(size, D_IN, generator=torch.Generator().manual_seed(100 + step))
        lr = eager[1].lr_at(step)
        want = train_step(*eager, x, step, lr)
        got = graphed(x, step, lr)
        assert all(torch.is_tensor(g["lr"]) for g in graphed_parts[2].param_groups), "the replayed Adam reads a tensor"
        tensors = {name: t for name, t in recipe.scalars.items()} | {f"lr{i}": g["lr"] for i, g in enumerate(graphed_parts[2].param_groups)}
        assert all(tensors[name] is t for name, t in kept.items()), "a graph reads the tensors it captured: written in place, never replaced"
        kept = tensors
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-7)
        for name, value in want.extra.items():
            torch.testing.assert_close(got.extra[name], value, rtol=1e-5, atol=1e-7)
    assert stand_in.replays == 6, "captured at step 1 and replayed from there (step 0 creates Adam's state); the short batch ran eagerly"
    for name in ("encoder_weight", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(graphed_parts[0], name), getattr(eager[0], name), rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(graphed_parts[3].since_fired, eager[3].since_fired)


def test_graphs_need_a_capturable_adam():
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedStep(*setup("seed", capturable=False), batch_size=BATCH, graph=StandInGraph())


def test_a_checkpoint_of_a_graphed_run_resumes_without_graphs():
    sae, recipe, optimizer, tracker = setup("topk", capturable=True)
    graphed = GraphedStep(sae, recipe, optimizer, tracker, batch_size=BATCH, graph=StandInGraph())
    for step in range(3):
        graphed(torch.randn(BATCH, D_IN), step, 1e-3)
    state = portable_optimizer_state(optimizer)
    assert all(type(g["lr"]) is float and g["capturable"] is False for g in state["param_groups"])
    assert torch.is_tensor(optimizer.param_groups[0]["lr"]), "the running optimiser keeps its tensor"
    resumed = adam(recipe.parameters(sae), 1e-3)
    resumed.load_state_dict(state)
    train_step(sae, recipe, resumed, tracker, torch.randn(BATCH, D_IN), 3, 1e-3)
    assert all(torch.isfinite(p).all() for p in recipe.parameters(sae))


@pytest.mark.parametrize("recipe_name", ["seed", "topk"])
def test_a_graphed_training_run_killed_and_resumed_ends_as_an_eager_one(tmp_path, monkeypatch, recipe_name):
    """The real loop with graphs on (the stand-in in place of CUDA's): checkpoints saved from it resume
    it, and it ends where the eager run does."""
    from clipscope.sae.io import load_sae
    from tests.conftest import array_cache, make_context
    from tests.worker.test_train import planted_data, small_config
    from worker.train import loop

    x, _ = planted_data(n=800)
    cfg = small_config(recipe_name, epochs=2, checkpoint_every=5)
    ref_ctx, ctx = make_context(tmp_path / "ref"), make_context(tmp_path / "run")
    reference = loop.train(ref_ctx, cfg, array_cache(ref_ctx.layout.activations, x))
    made = []

    def graphed_step(*args, **kwargs):
        made.append(GraphedStep(*args, graph=StandInGraph(), **kwargs))
        return made[-1]

    monkeypatch.setattr(loop, "_use_graphs", lambda setting, device: True)
    monkeypatch.setattr(loop, "GraphedStep", graphed_step)
    cache = array_cache(ctx.layout.activations, x)
    loop.train(ctx, cfg, cache, stop_after=13)
    resumed = loop.train(ctx, cfg, cache)
    assert resumed.trained_steps == 24 - 10 and len(made) == 2 and all(step.graph.replays > 0 for step in made)
    ref_sae, _ = load_sae(reference.sae_dir)
    sae, _ = load_sae(resumed.sae_dir)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name), getattr(ref_sae, name), rtol=1e-4, atol=1e-6, msg=name)


def test_a_failed_capture_is_reported_and_training_goes_on_eagerly(caplog):
    class FailingGraph(StandInGraph):
        def capture(self, fn):
            fn()  # the warm-up trained before the capture failed: the state must be put back
            raise RuntimeError("operation not permitted when stream is capturing")

    eager, parts = setup("topk", capturable=False), setup("topk", capturable=True)
    graphed = GraphedStep(*parts, batch_size=BATCH, graph=FailingGraph())
    for step in range(4):
        x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(step))
        train_step(*eager, x, step, 1e-3)
        graphed(x, step, 1e-3)
    assert graphed.failed and "capture of the training step failed" in caplog.text
    torch.testing.assert_close(parts[0].encoder_weight, eager[0].encoder_weight, rtol=1e-5, atol=1e-6)
