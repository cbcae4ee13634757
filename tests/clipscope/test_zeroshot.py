import copy

import open_clip
import pytest
import torch

from clipscope.clip.zeroshot import TrimmedPrompts, build_classifier, template_set

CLASSES = ["cat", "red circle on a striped background", "aeroplane", "maple tree", "x"]
TEMPLATES = template_set("clip_cifar")[1] + ["a long and rather wordy {} prompt that runs on for a good many tokens more than the rest."]


@pytest.fixture
def text_lengths(random_clip):
    """The sequence length of every batch the text transformer's first block sees: one per pass."""
    seen: list[int] = []
    handle = random_clip.model.transformer.resblocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    yield seen
    handle.remove()


def untrimmed(model) -> torch.Tensor:
    return open_clip.build_zero_shot_classifier(
        model, tokenizer=open_clip.get_tokenizer("ViT-B-32"), classnames=CLASSES, templates=TEMPLATES, device="cpu"
    )


def test_the_classifier_equals_open_clips_over_the_full_context(random_clip, text_lengths):
    expected = untrimmed(random_clip.model)
    assert set(text_lengths) == {77}
    text_lengths.clear()
    got = build_classifier(random_clip.model, "ViT-B-32", CLASSES, TEMPLATES, "cpu")
    lengths = open_clip.get_tokenizer("ViT-B-32")([t.format(c) for c in CLASSES for t in TEMPLATES]).argmax(-1) + 1
    assert max(text_lengths) == int(lengths.max()) < 40, "the prompts are encoded over their own length"
    assert len(text_lengths) > 1 and min(text_lengths) < int(lengths.max()), "in passes of similar length"
    assert min(text_lengths) >= int(lengths.min())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_last_block_computes_each_prompts_end_of_text_token_alone_and_the_result_is_the_same_without(random_clip, monkeypatch):
    from clipscope.clip import cpu_blocks

    expected = untrimmed(random_clip.model)
    last, forward, tokens = random_clip.model.transformer.resblocks[-1], cpu_blocks.forward, []

    def spy(block, x, mask=None, token=None):
        if block is last:
            tokens.append(token)
        return forward(block, x, mask, token)

    monkeypatch.setattr(cpu_blocks, "forward", spy)
    torch.testing.assert_close(build_classifier(random_clip.model, "ViT-B-32", CLASSES, TEMPLATES, "cpu"), expected, rtol=1e-5, atol=1e-5)
    assert tokens and all(torch.is_tensor(t) for t in tokens), "every pass's last block ran on the end-of-text tokens"
    assert any(len(set(t.tolist())) > 1 for t in tokens), "a pass holding prompts of several lengths pools each at its own end"
    monkeypatch.setattr(cpu_blocks, "one_token_applies", lambda block, x: False)  # e.g. the mkl kernel: the whole tower
    tokens.clear()
    torch.testing.assert_close(build_classifier(random_clip.model, "ViT-B-32", CLASSES, TEMPLATES, "cpu"), expected, rtol=1e-5, atol=1e-5)
    assert all(t is None for t in tokens), "the last block ran whole"


def test_prompts_of_a_length_join_a_longer_pass_while_the_padding_stays_small(monkeypatch):
    from clipscope.clip import zeroshot

    monkeypatch.setattr(zeroshot, "_PASS_TOKENS", 16)
    ends = torch.tensor([20] * 3 + [19] * 16 + [18] * 40 + [10] * 2 + [9] * 5)  # longest first, as encode_text sorts them
    # 16 prompts one token shorter: 16 padded tokens, joined; 40 two shorter: 80, a pass of their own;
    # 2 eight shorter: 16, joined; 5 nine shorter: 45, their own
    assert zeroshot._passes(ends) == [19, 42, 5]
    assert zeroshot._passes(ends.to("meta")) == [len(ends)], "off the CPU: one pass"


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
