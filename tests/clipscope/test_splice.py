import pytest
import torch

from clipscope.clip.zeroshot import correct_at_k, template_set, zero_shot_logits
from clipscope.errors import ClipScopeError
from clipscope.sae.model import TopKSAE
from clipscope.splice import check_error_splice, spliced_features


def perfect_sae(d: int) -> TopKSAE:
    """Reconstructs any x exactly: latents relu(x) and relu(-x), decoded by +I and -I; k = d suffices."""
    sae = TopKSAE(d, 2 * d, d, use_b_dec=False)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def lossy_sae(d: int, seed: int = 0) -> TopKSAE:
    sae = TopKSAE(d, 256, 8, use_b_dec=False)
    sae.init_weights("tied", generator=torch.Generator().manual_seed(seed))
    return sae


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tokens", ["cls", "all"])
def test_spliced_plus_error_reproduces_clean_logits(random_clip, images, tokens):
    feats = spliced_features(random_clip.visual, lossy_sae(768), images, 10, tokens, ("clean", "spliced", "spliced_error"))
    classifier = torch.nn.functional.normalize(torch.randn(512, 10, generator=torch.Generator().manual_seed(2)), dim=0)
    logits = {c: zero_shot_logits(random_clip.model, f, classifier) for c, f in feats.items()}
    assert check_error_splice(logits["clean"], logits["spliced_error"]) <= 1e-4
    assert not torch.allclose(logits["clean"], logits["spliced"], rtol=1e-3, atol=1e-3), "a lossy SAE must change the output"


def test_the_splice_check_fails_loudly_when_the_error_comes_from_another_block(random_clip, images):
    sae = lossy_sae(768)
    at10 = spliced_features(random_clip.visual, sae, images, 10, "cls", ("clean",))["clean"]
    at3 = spliced_features(random_clip.visual, sae, images, 3, "cls", ("spliced",))["spliced"]
    with pytest.raises(ClipScopeError, match="Splice check failed"):
        check_error_splice(at10, at3)


def test_a_perfect_sae_leaves_the_output_unchanged(random_clip, images):
    feats = spliced_features(random_clip.visual, perfect_sae(768), images, 10, "cls", ("clean", "spliced"))
    torch.testing.assert_close(feats["spliced"], feats["clean"], rtol=1e-5, atol=1e-5)


def test_splicing_at_another_block_changes_the_output(random_clip, images):
    sae = lossy_sae(768)
    at10 = spliced_features(random_clip.visual, sae, images, 10, "cls", ("spliced",))["spliced"]
    at5 = spliced_features(random_clip.visual, sae, images, 5, "cls", ("spliced",))["spliced"]
    assert (at10 - at5).abs().max() > 1e-3


def test_mean_ablation_replaces_the_tokens_with_the_given_mean(random_clip, images):
    mean = torch.randn(1, 768)
    out = spliced_features(random_clip.visual, lossy_sae(768), images, 10, "cls", ("clean", "mean_ablation"), mean=mean)
    by_hand = spliced_features(random_clip.visual, lossy_sae(768), images[:1], 10, "cls", ("mean_ablation",), mean=mean)
    torch.testing.assert_close(out["mean_ablation"][:1], by_hand["mean_ablation"], rtol=1e-5, atol=1e-5)
    # every image's edited CLS is the same vector, but the patches still differ, so outputs differ per image
    assert not torch.allclose(out["mean_ablation"][0], out["mean_ablation"][1])
    assert not torch.allclose(out["mean_ablation"], out["clean"])


def test_top_k_accuracy_matches_a_hand_computation():
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 0],  # label 0: top-1 hit
            [1.0, 9, 8, 7, 6, 5, 0],  # label 5: 5th -> top-5 hit only
            [1.0, 9, 8, 7, 6, 5, 0],  # label 6: last -> miss
            [0.0, 1, 9, 0, 0, 0, 0],  # label 1: 2nd -> top-5 hit
        ]
    )
    labels = torch.tensor([0, 5, 6, 1])
    assert correct_at_k(logits, labels) == {1: 1, 5: 3}
    assert correct_at_k(logits[:, :3], torch.tensor([0, 2, 2, 1])) == {1: 1, 5: 4}  # 3 classes: top-5 = all


def test_logits_use_the_models_logit_scale(random_clip):
    feats = torch.nn.functional.normalize(torch.randn(2, 512), dim=1)
    classifier = torch.nn.functional.normalize(torch.randn(512, 3), dim=0)
    expected = random_clip.model.logit_scale.exp() * feats @ classifier
    torch.testing.assert_close(zero_shot_logits(random_clip.model, feats * 7.0, classifier), expected)
    assert random_clip.model.logit_scale.exp() > 10  # CLIP's temperature is not 1


def test_template_sets():
    name, templates = template_set("clip_cifar")
    assert len(templates) == 18 and templates[0] == "a photo of a {}."
    assert len(template_set("openai_imagenet")[1]) == 80
    assert template_set(["an image of {}"])[1] == ["an image of {}"]
    with pytest.raises(ValueError):
        template_set(["no placeholder"])
