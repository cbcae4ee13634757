import copy

import open_clip
import pytest
import torch

from clipscope.clip.zeroshot import TrimmedPrompts, build_classifier, template_set

CLASSES = ["cat", "red circle on a striped background", "aeroplane", "maple tree", "x"]
TEMPLATES = template_set("clip_cifar")[1] + ["a long and rather wordy {} prompt that runs on for a good many tokens more than the rest."]


@pytest.fixture
def text_lengths(random_clip, monkeypatch):
    """The sequence length of every batch the text transformer sees."""
    seen: list[int] = []
    forward = random_clip.model.transformer.forward

    def spy(x, *args, **kwargs):
        seen.append(x.shape[1])
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(random_clip.model.transformer, "forward", spy)
    return seen


def untrimmed(model) -> torch.Tensor:
    return open_clip.build_zero_shot_classifier(
        model, tokenizer=open_clip.get_tokenizer("ViT-B-32"), classnames=CLASSES, templates=TEMPLATES, device="cpu"
    )


def test_the_classifier_equals_open_clips_over_the_full_context(random_clip, text_lengths):
    expected = untrimmed(random_clip.model)
    assert set(text_lengths) == {77}
    text_lengths.clear()
    got = build_classifier(random_clip.model, "ViT-B-32", CLASSES, TEMPLATES, "cpu")
    longest = int(open_clip.get_tokenizer("ViT-B-32")([t.format(c) for c in CLASSES for t in TEMPLATES]).argmax(-1).max()) + 1
    assert max(text_lengths) == longest < 40, "the prompts are encoded over their own length"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", [{"text_pool_type": "last"}, {"attn_mask": None}], ids=["pool_last", "no_causal_mask"])
def test_a_text_tower_where_trimming_would_change_the_result_gets_the_full_context(random_clip, text_lengths, change):
    model = copy.copy(random_clip.model)  # shares the towers; the session's model keeps its attributes and buffers
    model._buffers = dict(model._buffers)
    for name, value in change.items():
        setattr(model, name, value)
    assert not TrimmedPrompts.exact_for(model)
    build_classifier(model, "ViT-B-32", CLASSES[:2], TEMPLATES[:2], "cpu")
    assert set(text_lengths) == {77}
    assert random_clip.model.attn_mask is not None and random_clip.model.text_pool_type == "argmax"
