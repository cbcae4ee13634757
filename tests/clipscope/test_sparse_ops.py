"""The sparse encoder backward and sparse decoder give the dense reference's results."""

import pytest
import torch

from clipscope.config import TrainConfig
from clipscope.sae.dense_reference import DenseTopKSAE
from clipscope.sae.metrics import FiringTracker
from clipscope.sae.model import TopKSAE
from worker.train.recipes import make_recipe

D_IN, D_SAE, K = 48, 384, 12


def pair(use_b_dec: bool, seed: int = 0):
    sparse = TopKSAE(D_IN, D_SAE, K, use_b_dec=use_b_dec)
    sparse.init_weights("tied", generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sparse.b_enc.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 1))
        if use_b_dec:
            sparse.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 2))
    dense = DenseTopKSAE(D_IN, D_SAE, K, use_b_dec=use_b_dec)
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


def _tracker(dead_every: int):
    tracker = FiringTracker(D_SAE, dead_after=1)
    tracker.since_fired.zero_()
    tracker.since_fired[::dead_every] = 5  # every dead_every-th latent is dead
    return tracker


@pytest.mark.parametrize("recipe", ["seed", "topk"])
def test_loss_and_every_gradient_equal_the_dense_reference(recipe):
    cfg = TrainConfig(recipe=recipe, auxk_k=20)
    sparse, dense = pair(use_b_dec=recipe == "topk")
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    tracker = _tracker(3)
    outs = []
    for sae in (sparse, dense):
        r = make_recipe(cfg, 100, D_IN, D_SAE)
        r.prepare(sae)
        out = r.loss(sae, x, step=10, tracker=tracker)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0].x_hat, outs[1].x_hat, rtol=1e-5, atol=1e-5)
    if recipe == "topk":
        assert outs[1].extra["auxk"] > 0, "the test must exercise AuxK"
    for name in ("encoder_weight", "b_enc", "W_dec", "b_dec"):
        a, b = getattr(sparse, name), getattr(dense, name)
        if b.grad is None:
            assert a.grad is None, name
            continue
        assert b.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_input_gradient_equals_the_dense_reference():
    sparse, dense = pair(use_b_dec=True)
    grads = []
    for sae in (sparse, dense):
        x = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(4)).requires_grad_()
        sae.decode(sae.encode(x)).pow(2).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_training_steps_stay_equal_to_the_dense_reference():
    cfg = TrainConfig(recipe="topk")
    sparse, dense = pair(use_b_dec=True)
    tracker = _tracker(4)
    opts = []
    for sae in (sparse, dense):
        r = make_recipe(cfg, 50, D_IN, D_SAE)
        r.prepare(sae)
        opts.append((sae, r, torch.optim.Adam(r.parameters(sae), lr=1e-3)))
    for step in range(5):
        x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(10 + step))
        for sae, r, opt in opts:
            out = r.loss(sae, x, step, tracker)
            opt.zero_grad()
            out.loss.backward()
            r.before_step(sae)
            opt.step()
            r.after_step(sae)
    for name in ("encoder_weight", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name), rtol=1e-4, atol=1e-5, msg=name)


def test_slots_that_relu_zeroed_get_no_gradient_as_in_the_dense_reference():
    sparse, dense = pair(use_b_dec=False)
    with torch.no_grad():
        for sae in (sparse, dense):
            sae.b_enc.fill_(-3.0)  # most pre-activations negative: fewer than k latents fire
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(5))
    assert (sparse.encode(x).l0() < K).all()
    for sae in (sparse, dense):
        code = sae.encode(x)
        (sae.decode(code).pow(2).sum() + code.values.sum()).backward()
    torch.testing.assert_close(sparse.encoder_weight.grad, dense.encoder_weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sparse.b_enc.grad, dense.b_enc.grad, rtol=1e-4, atol=1e-6)
