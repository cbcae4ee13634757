"""Steering: features' activations edited in the residual stream, checked against CLIP's own forward
pass with the stream edited by a forward hook, and against the attribution's single removals."""

import pytest
import torch

from clipscope.attribution import explain
from clipscope.clip.hooks import residual_at, token_slice
from clipscope.feature_edits import Edit
from clipscope.steering import steer
from tests.clipscope.stream import CLASSES, LAYER, hooked_logits, sae_for


def stream_and_code(random_clip, image, tokens="cls"):
    sae = sae_for()
    with torch.no_grad():
        resid = residual_at(random_clip.visual, image, LAYER)
        code = sae.encode(resid[0, token_slice(tokens)])
    return sae, resid, code


def firing(code) -> list[int]:
    """The features that fire, strongest first."""
    return [int(f) for f in code.indices[0][code.values[0].argsort(descending=True)] if code.values[0][code.indices[0] == f].max() > 0]


@pytest.mark.parametrize("tokens", ["cls", "all"])
def test_edits_are_the_whole_model_with_the_activations_changed_in_the_stream(random_clip, image, classifier, tokens):
    """Scaling a firing feature, setting a firing one and setting one that does not fire: the stream
    changes by each feature's new activation minus its old, per token, times its atom."""
    sae, resid, code = stream_and_code(random_clip, image, tokens)
    on = firing(code)
    off = next(f for f in range(sae.d_sae) if f not in code.indices)
    edits = [Edit(on[0], 3.0, scale=True), Edit(on[1], 0.25), Edit(off, 2.0)]
    out = steer(random_clip.model, sae, resid, LAYER, tokens, classifier, CLASSES, edits)
    per_token = {f: (code.values * (code.indices == f)).sum(-1) for f in (on[0], on[1], off)}  # [tokens]
    new = {on[0]: 3.0 * per_token[on[0]], on[1]: torch.full_like(per_token[on[1]], 0.25), off: torch.full_like(per_token[off], 2.0)}
    added = sum((new[f] - per_token[f])[:, None] * sae.W_dec[f].detach()[None] for f in new)
    clean = hooked_logits(random_clip.model, image, classifier, tokens)
    steered = hooked_logits(random_clip.model, image, classifier, tokens, -added)
    torch.testing.assert_close(out.clean, clean.softmax(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.steered, steered.softmax(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.logit_change, steered - clean, rtol=1e-4, atol=2e-4)
    assert out.before == pytest.approx([float(per_token[f].max()) for f in new], rel=1e-6)
    assert out.after == pytest.approx([float(new[f].max()) for f in new], rel=1e-6)
    assert float((out.steered - out.clean).abs().max()) > 1e-4, "the edits move the prediction"


def test_an_edit_that_changes_nothing_is_clean_clip(random_clip, image, classifier):
    sae, resid, code = stream_and_code(random_clip, image)
    on = firing(code)
    same = [Edit(on[0], 1.0, scale=True), Edit(on[1], float(code.values[0][code.indices[0] == on[1]].max()))]
    out = steer(random_clip.model, sae, resid, LAYER, "cls", classifier, CLASSES, same)
    torch.testing.assert_close(out.steered, out.clean, rtol=1e-5, atol=1e-6)
    assert out.before == pytest.approx(out.after)


def test_scaling_a_feature_to_zero_is_the_attribution_s_removal(random_clip, image, classifier):
    sae, resid, _ = stream_and_code(random_clip, image)
    explained = explain(random_clip.model, sae, resid, LAYER, "cls", classifier, CLASSES, exact=3)
    for effect in explained.effects:
        out = steer(random_clip.model, sae, resid, LAYER, "cls", classifier, CLASSES, [Edit(effect.index, 0.0, scale=True)])
        assert float(out.logit_change[explained.target]) == pytest.approx(effect.logit_change, abs=2e-5)
        assert float(out.steered[explained.target]) == pytest.approx(effect.probability, abs=1e-6)
        assert out.after == [0.0]


def test_bad_edits_are_refused(random_clip, image, classifier):
    sae, resid, code = stream_and_code(random_clip, image)
    f = firing(code)[0]
    for edits, message in (([], "at least one edit"), ([Edit(sae.d_sae, 1.0)], "outside 0..511"), ([Edit(-1, 1.0)], "outside"),
                           ([Edit(f, 0.0), Edit(f, 2.0, scale=True)], "edited once")):
        with pytest.raises(ValueError, match=message):
            steer(random_clip.model, sae, resid, LAYER, "cls", classifier, CLASSES, edits)
    with pytest.raises(ValueError, match="one image"):
        steer(random_clip.model, sae, torch.zeros(2, 50, 768), LAYER, "cls", classifier, CLASSES, [Edit(f, 0.0)])


@pytest.mark.parametrize("tokens", ["cls", "all"])
def test_a_batch_is_edited_as_each_image_alone(random_clip, tokens):
    from clipscope.steering import edit_stream

    sae = sae_for()
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        resid = residual_at(random_clip.visual, images, LAYER)
        edits = [Edit(int(sae.encode(resid[0, :1]).indices[0][0]), 0.0, scale=True), Edit(7, 1.5)]
        edited, before, after = edit_stream(sae, resid, tokens, edits)
        for i in range(3):
            alone, b, a = edit_stream(sae, resid[i : i + 1], tokens, edits)
            torch.testing.assert_close(edited[i : i + 1], alone)
            torch.testing.assert_close(before[i], b[0])
            torch.testing.assert_close(after[i], a[0])
    assert before.shape == after.shape == (3, 2) and float(before[0, 0]) > 0 and float(after[0, 0]) == 0.0
    assert torch.equal(after[:, 1], torch.full((3,), 1.5))
    assert not torch.equal(edited, resid)
    if tokens == "cls":
        assert torch.equal(edited[:, 1:], resid[:, 1:]), "only the SAE's tokens are edited"


def test_edits_are_read_from_text():
    from clipscope.feature_edits import EditError, parse_edits

    assert parse_edits("12=0, #7*2.5\n 3 x 1e-1, 4×2, 5 = -1.5", 64) == (
        Edit(12, 0.0), Edit(7, 2.5, scale=True), Edit(3, 0.1, scale=True), Edit(4, 2.0, scale=True), Edit(5, -1.5))
    assert parse_edits("", 64) == () and parse_edits(None, 64) == () and parse_edits(" , ,", 64) == ()
    for text, says in (("12", "Cannot read"), ("a=1", "Cannot read"), ("64=0", "features 0 to 63"), ("1=2, 1*3", "edited twice"),
                       ("1=1e5", "beyond"), ("1=inf", "Cannot read"), (",".join(f"{i}=0" for i in range(33)), "at most 32")):
        with pytest.raises(EditError, match=says):
            parse_edits(text, 64)


@pytest.mark.parametrize("tokens", ["cls", "all"])
def test_a_code_the_caller_has_is_read_instead_of_encoding_again(random_clip, image, classifier, tokens, monkeypatch):
    """Explanation and edits of an analysed upload read the analysis's own code: the same answers
    without a second pass through the encoder."""
    sae, resid, code = stream_and_code(random_clip, image, tokens)
    on = firing(code)
    edits = [Edit(on[0], 3.0, scale=True), Edit(on[1], 0.25)]
    explained, steered = (explain(random_clip.model, sae, resid, LAYER, tokens, classifier, CLASSES, exact=4),
                          steer(random_clip.model, sae, resid, LAYER, tokens, classifier, CLASSES, edits))

    def refuse(*_args, **_kwargs):
        raise RuntimeError("encoded again")

    monkeypatch.setattr(sae, "encode", refuse)
    again = explain(random_clip.model, sae, resid, LAYER, tokens, classifier, CLASSES, exact=4, code=code)
    assert again.estimates == explained.estimates and again.effects == explained.effects
    torch.testing.assert_close(steer(random_clip.model, sae, resid, LAYER, tokens, classifier, CLASSES, edits, code).steered, steered.steered)
