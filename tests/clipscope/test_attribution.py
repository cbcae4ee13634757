"""Feature attribution of a zero-shot prediction, checked against CLIP's own forward pass with the
residual stream edited by a forward hook (an independent path from ``continue_from``)."""

import pytest
import torch

from clipscope.attribution import explain
from clipscope.clip.hooks import residual_at, token_slice
from tests.clipscope.stream import CLASSES, LAYER, hooked_logits, sae_for

def run(random_clip, image, classifier, tokens="cls", **kw):
    with torch.no_grad():
        resid = residual_at(random_clip.visual, image, LAYER)
    return explain(random_clip.model, sae_for(), resid, LAYER, tokens, classifier, CLASSES, **kw)


@pytest.mark.parametrize("tokens", ["cls", "all"])
def test_each_measured_effect_is_the_whole_model_with_the_feature_removed_from_the_stream(random_clip, image, classifier, tokens):
    sae = sae_for()
    with torch.no_grad():
        x = residual_at(random_clip.visual, image, LAYER)[0, token_slice(tokens)]
        code = sae.encode(x)
    out = run(random_clip, image, classifier, tokens, exact=6)
    clean = hooked_logits(random_clip.model, image, classifier, tokens)
    torch.testing.assert_close(out.clean, clean.softmax(-1), rtol=1e-4, atol=1e-5)
    assert out.target == int(clean.argmax())
    assert len(out.effects) == 6
    for e in out.effects:
        per_token = (code.values * (code.indices == e.index)).sum(-1)  # [tokens]
        removed = per_token[:, None] * sae.W_dec[e.index][None].detach()
        logits = hooked_logits(random_clip.model, image, classifier, tokens, removed)
        assert e.logit_change == pytest.approx(float(logits[out.target] - clean[out.target]), abs=2e-4)
        assert e.probability == pytest.approx(float(logits.softmax(-1)[out.target]), abs=1e-5)
        assert e.top_class == int(logits.argmax())
        assert e.activation == pytest.approx(float(per_token.max()), rel=1e-6)
    changes = [e.logit_change for e in out.effects]
    assert changes == sorted(changes)


@pytest.mark.parametrize("tokens", ["cls", "all"])
def test_the_measured_copies_of_a_cls_stream_share_the_last_blocks_other_tokens(random_clip, image, classifier, tokens, monkeypatch):
    """Removing a feature of a CLS SAE edits the CLS token alone, so the copies' other tokens are computed once."""
    from clipscope.clip import cpu_blocks

    calls, forward = [], cpu_blocks.forward
    monkeypatch.setattr(cpu_blocks, "forward", lambda block, x, *a, **kw: calls.append((x.shape[0], kw.get("shared_rest"))) or forward(block, x, *a, **kw))
    run(random_clip, image, classifier, tokens, exact=6)
    assert ((6, True) in calls) == (tokens == "cls") and ((6, False) in calls) == (tokens == "all")


def test_estimates_are_the_first_order_change(random_clip, image, classifier):
    """The estimate is the derivative of the logit along the removed vector: a small fraction of it
    removed changes the logit by that fraction of the estimate."""
    sae = sae_for()
    with torch.no_grad():
        x = residual_at(random_clip.visual, image, LAYER)[0, :1]
        code = sae.encode(x)
    out = run(random_clip, image, classifier)
    assert set(out.estimates) == set(code.indices[code.values > 0].tolist())
    clean = hooked_logits(random_clip.model, image, classifier, "cls")
    eps = 1e-2
    for f in sorted(out.estimates, key=lambda f: -abs(out.estimates[f]))[:4]:
        removed = eps * (code.values * (code.indices == f)).sum(-1)[:, None] * sae.W_dec[f][None].detach()
        slope = float(hooked_logits(random_clip.model, image, classifier, "cls", removed)[out.target] - clean[out.target]) / eps
        assert slope == pytest.approx(out.estimates[f], rel=0.05, abs=1e-3)


def test_measured_features_are_those_with_the_largest_estimates(random_clip, image, classifier):
    out = run(random_clip, image, classifier, exact=5)
    ranked = sorted(out.estimates, key=lambda f: (-abs(out.estimates[f]), f))
    assert {e.index for e in out.effects} == set(ranked[:5])


def test_the_spliced_prediction_uses_the_reconstruction(random_clip, image, classifier):
    sae = sae_for()
    with torch.no_grad():
        x = residual_at(random_clip.visual, image, LAYER)[0, :1]
        x_hat, _ = sae(x)
    spliced = hooked_logits(random_clip.model, image, classifier, "cls", x - x_hat)
    torch.testing.assert_close(run(random_clip, image, classifier).spliced, spliced.softmax(-1), rtol=1e-4, atol=1e-5)


def test_an_asked_for_target_class_is_the_one_explained(random_clip, image, classifier):
    default = run(random_clip, image, classifier)
    other = (default.target + 1) % len(CLASSES)
    out = run(random_clip, image, classifier, target=other)
    assert out.target == other
    assert out.estimates != default.estimates


def test_a_contrast_explains_the_margin_over_another_class(random_clip, image, classifier):
    """With a contrast class, each measured change is the change of the target's logit minus the
    contrast's: the difference of the two single-class explanations' changes, feature by feature."""
    target, contrast = 0, 3
    margin = run(random_clip, image, classifier, target=target, contrast=contrast, exact=40)
    alone = {e.index: e for e in run(random_clip, image, classifier, target=target, exact=40).effects}
    other = {e.index: e for e in run(random_clip, image, classifier, target=contrast, exact=40).effects}
    assert margin.contrast == contrast and len(margin.effects) == len(alone) == len(other) == len(margin.estimates)
    for e in margin.effects:
        assert e.logit_change == pytest.approx(alone[e.index].logit_change - other[e.index].logit_change, abs=2e-5)
        assert e.estimate == pytest.approx(alone[e.index].estimate - other[e.index].estimate, abs=1e-6)
        assert e.probability == pytest.approx(alone[e.index].probability, abs=1e-6)  # still the target's probability
    with pytest.raises(ValueError, match="must differ"):
        run(random_clip, image, classifier, target=1, contrast=1)
    with pytest.raises(ValueError, match="contrast class 9 is outside"):
        run(random_clip, image, classifier, contrast=9)


def test_bad_arguments_are_refused(random_clip, image, classifier):
    with pytest.raises(ValueError, match="outside"):
        run(random_clip, image, classifier, target=len(CLASSES))
    with pytest.raises(ValueError, match="one image"):
        explain(random_clip.model, sae_for(), torch.zeros(2, 50, 768), LAYER, "cls", classifier, CLASSES)
    with pytest.raises(ValueError, match="one column per class"):
        explain(random_clip.model, sae_for(), torch.zeros(1, 50, 768), LAYER, "cls", classifier, CLASSES[:2])


def test_class_support_is_the_mean_over_each_class_s_images_of_the_centred_logit_s_first_order_share(random_clip, classifier):
    """A batch of images at once equals each image alone: per class, the features' supports for the
    class's logit minus the mean logit, summed over the class's images and divided by their count."""
    from clipscope.attribution import ClassSupport

    sae = sae_for()
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([2, 0, 2, 4])
    with torch.no_grad():
        resid = residual_at(random_clip.visual, images, LAYER)
    tally = ClassSupport(len(CLASSES), sae.d_sae, "cpu")
    tally.add(random_clip.model, sae, resid, LAYER, "cls", classifier, labels)
    expected = torch.zeros(len(CLASSES), sae.d_sae, dtype=torch.float64)
    for image, label in zip(resid, labels.tolist()):
        for c in range(len(CLASSES)):  # centred logit = own logit - mean of all: explain's estimates, class by class
            estimates = explain(random_clip.model, sae, image[None], LAYER, "cls", classifier, CLASSES, target=c, exact=1).estimates
            for f, e in estimates.items():
                expected[label, f] += -e * ((c == label) - 1 / len(CLASSES))
    counts = torch.bincount(labels, minlength=len(CLASSES)).clamp(min=1)[:, None]
    torch.testing.assert_close(tally.total.view(len(CLASSES), -1) / counts, expected / counts, rtol=1e-4, atol=1e-6)
    top = tally.top(3)
    assert top[1] == [] and top[3] == [], "classes without images support nothing"
    mean = expected[2] / 2
    best = [f for f in mean.argsort(descending=True)[:3].tolist() if mean[f] > 0]
    assert [f for f, _ in top[2]] == best and all(v == pytest.approx(float(mean[f]), abs=1e-5) for f, v in top[2])


@pytest.mark.parametrize("rows", [1, 3, 40], ids=["one_image", "few_slots", "many_slots"])
def test_slopes_along_the_fired_atoms_equal_the_dense_product_s(rows, monkeypatch):
    from clipscope.attribution import slopes_along

    gen = torch.Generator().manual_seed(rows)
    atoms, g = torch.randn(256, 16, generator=gen), torch.randn(rows, 16, generator=gen)
    indices = torch.stack([torch.randperm(256, generator=gen)[:32] for _ in range(rows)])
    products = []
    matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: products.append(b.shape) or matmul(a, b))
    got = slopes_along(g, atoms, indices, chunk=16)
    assert (products != []) == (rows * 32 * 2 > 256), "few slots read only their atoms; many, every atom once a chunk"
    torch.testing.assert_close(got, torch.einsum("rd,rkd->rk", g, atoms[indices]), rtol=1e-5, atol=1e-5)
