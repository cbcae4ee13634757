import copy
import gc
import weakref

import open_clip
import pytest
import torch
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

from clipscope import gemm
from clipscope.clip import cpu_blocks
from clipscope.clip.hooks import continue_from, residual_at

pytestmark = pytest.mark.skipif(gemm.cpu_kernel() != "onednn", reason="this torch has no oneDNN linear")


def _layer_scaled_block() -> ResidualAttentionBlock:
    """A small block with LayerScale and every parameter random (biases and norms too)."""
    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 4, ls_init_value=0.5).eval().requires_grad_(False)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return block


@pytest.fixture
def counted(monkeypatch):
    """The blocks :func:`cpu_blocks.forward` ran, in order."""
    ran, forward = [], cpu_blocks.forward
    monkeypatch.setattr(cpu_blocks, "forward", lambda block, *args: ran.append(block) or forward(block, *args))
    return ran


@pytest.mark.parametrize("batch", [1, 3])
def test_a_block_through_onednn_equals_the_module(random_clip, batch):
    x = torch.randn(batch, 50, 768, generator=torch.Generator().manual_seed(batch))
    causal = torch.full((50, 50), float("-inf")).triu(1)
    block = random_clip.visual.transformer.resblocks[3]
    for block, inputs, mask in ((block, x, None), (block, x, causal), (_layer_scaled_block(), x[:, :, :64], None)):
        with torch.inference_mode():
            assert cpu_blocks.plain(block) and cpu_blocks.applies(block, inputs)
            module = ResidualAttentionBlock.forward(block, inputs, attn_mask=mask)  # open_clip's own, not the installed one
            torch.testing.assert_close(cpu_blocks.forward(block, inputs, mask), module, rtol=1e-5, atol=1e-5)
            for token in (0, -1):  # the image tower's CLS token; the text tower's last (its row of the causal mask sees every token)
                one = slice(token, token + 1 or None)
                torch.testing.assert_close(cpu_blocks.forward(block, inputs, mask, token=token), module[:, one], rtol=1e-5, atol=1e-5)
            each = torch.tensor([49, 10, 0])[:batch]  # a position per row: the end-of-text tokens of prompts sharing a pass
            torch.testing.assert_close(cpu_blocks.forward(block, inputs, mask, token=each)[:, 0], module[torch.arange(batch), each], rtol=1e-5, atol=1e-5)


def test_it_applies_to_plain_blocks_on_the_cpu_in_fp32_without_autograd(random_clip, monkeypatch):
    block, x = random_clip.visual.transformer.resblocks[0], torch.randn(2, 50, 768)
    assert not cpu_blocks.plain(CustomResidualAttentionBlock(768, 12))
    assert not cpu_blocks.plain(ResidualAttentionBlock(768, 12, is_cross_attention=True))
    with torch.no_grad():
        assert cpu_blocks.applies(block, x)
        assert not cpu_blocks.applies(block, x.double())
        assert not cpu_blocks.applies(block, x[0])
    trainable = _layer_scaled_block().requires_grad_(True)
    assert not cpu_blocks.applies(trainable, x[:, :, :64])  # autograd records the module's own forward
    with torch.no_grad():
        assert cpu_blocks.applies(trainable, x[:, :, :64])
        monkeypatch.setattr(gemm, "cpu_kernel", lambda: "mkl")
        assert not cpu_blocks.applies(block, x)


def test_load_clip_installs_it_on_both_towers_and_hooks_still_fire(random_clip, counted):
    blocks = [m for m in random_clip.model.modules() if isinstance(m, ResidualAttentionBlock)]
    assert len(blocks) == 24 and all(type(b) is cpu_blocks.CpuResidualAttentionBlock for b in blocks)
    assert type(random_clip.visual.conv1) is cpu_blocks.CpuPatchEmbedding
    assert cpu_blocks.install(random_clip.model) == 0  # already there
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    seen = []
    handle = random_clip.visual.transformer.resblocks[2].register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            stream = residual_at(random_clip.visual, images, 4)
    finally:
        handle.remove()
    assert counted == list(random_clip.visual.transformer.resblocks[:5])  # and it stops after the hooked block
    assert len(seen) == 1 and stream.shape == (2, 50, 768)
    counted.clear()
    with torch.no_grad():
        random_clip.model.encode_text(open_clip.tokenize(["a photo of a dog."]))
    assert counted == list(random_clip.model.transformer.resblocks)


def test_a_model_computes_what_it_computed_before_install_and_under_autograd_as_the_module(random_clip, counted):
    module_model = copy.deepcopy(random_clip.model)
    for block in module_model.modules():
        if type(block) is cpu_blocks.CpuResidualAttentionBlock:
            block.__class__ = ResidualAttentionBlock  # open_clip's own forwards
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    text = open_clip.tokenize(["a photo of a dog.", "a blurry photo of the number seven."])
    with torch.no_grad():
        for ours, module in ((random_clip.model.encode_image(images), module_model.encode_image(images)),
                             (random_clip.model.encode_text(text), module_model.encode_text(text))):
            torch.testing.assert_close(ours, module, rtol=1e-5, atol=1e-5)
        stream = residual_at(random_clip.visual, images[:1], 1)
    assert len(counted) == 24 + 2
    counted.clear()
    stream.requires_grad_(True)
    random_clip.visual.transformer.resblocks[2](stream).sum().backward()
    assert counted == [] and stream.grad is not None


def test_the_last_block_computes_the_cls_token_alone_with_and_without_autograd(random_clip, monkeypatch):
    visual, last = random_clip.visual, random_clip.visual.transformer.resblocks[-1]
    with torch.no_grad():
        stream = residual_at(visual, torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(4)), 9)
    calls = []
    forward = cpu_blocks.forward
    monkeypatch.setattr(cpu_blocks, "forward", lambda block, *args, **kw: calls.append((block, kw)) or forward(block, *args, **kw))

    def embedding_and_gradient():
        s = stream.clone().requires_grad_(True)
        out = continue_from(visual, s, 9)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), s)
        return out.detach(), grad

    ours = embedding_and_gradient()
    assert (last, {"token": 0, "shared_rest": False}) in calls  # under autograd too
    calls.clear()
    monkeypatch.setattr(cpu_blocks, "one_token_applies", lambda block, x: False)
    module = embedding_and_gradient()
    assert all(kw == {} for _, kw in calls)
    for a, b in zip(ours, module):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture
def qkv_rows(monkeypatch):
    """The rows of every product :func:`cpu_blocks.forward` ran with the attention's packed QKV weight."""
    rows, linear = [], gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda x, w, b=None: (rows.append(x.shape[0]) if w.shape[0] == 3 * w.shape[1] else None) or linear(x, w, b))
    return rows


@pytest.mark.parametrize("token,copies", [(0, 5), (-1, 5), (4, 5), (0, 1)])
def test_copies_edited_at_one_token_share_the_other_tokens_keys_and_values(random_clip, qkv_rows, token, copies):
    causal = torch.full((50, 50), float("-inf")).triu(1)
    for block, width, mask in ((random_clip.visual.transformer.resblocks[11], 768, None), (random_clip.visual.transformer.resblocks[11], 768, causal),
                               (_layer_scaled_block(), 64, None)):
        g = torch.Generator().manual_seed(6)
        x = torch.randn(1, 50, width, generator=g).repeat(copies, 1, 1)
        x[:, token] += torch.randn(copies, width, generator=g)  # copies of one stream, each edited at that token
        one = slice(token, token + 1 or None)
        with torch.inference_mode():
            module = ResidualAttentionBlock.forward(block, x, attn_mask=mask)[:, one]
            qkv_rows.clear()
            torch.testing.assert_close(cpu_blocks.forward(block, x, mask, token=token, shared_rest=True), module, rtol=1e-5, atol=1e-5)
            assert qkv_rows == [50 + copies - 1], "the first row whole, then the others' own token"
    x = x.clone().requires_grad_(True)  # autograd would give the other rows no gradient at the shared tokens: the whole product
    qkv_rows.clear()
    (grad,) = torch.autograd.grad(cpu_blocks.forward(block, x, token=token, shared_rest=True).sum(), x)
    assert qkv_rows == [copies * 50] and grad.abs().sum(-1).gt(0).all()


def test_continuing_from_the_block_before_the_last_shares_the_keys_and_values_of_cls_edits(random_clip, qkv_rows):
    visual = random_clip.visual
    with torch.no_grad():
        for layer in (10, 9):
            stream = residual_at(visual, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7)), layer).repeat(4, 1, 1)
            stream[:, 0] += torch.randn(4, 768, generator=torch.Generator().manual_seed(8))
            qkv_rows.clear()
            shared = continue_from(visual, stream, layer, edited_at=slice(0, 1))
            last = qkv_rows[-1]
            torch.testing.assert_close(shared, continue_from(visual, stream, layer), rtol=1e-5, atol=1e-5)
            # after block 9, block 10 carries each copy's edit to every token: the last block runs on all of them
            assert last == (50 + 4 - 1 if layer == 10 else 4 * 50), layer


def test_a_hook_on_the_last_block_sees_its_whole_output(random_clip):
    visual, last = random_clip.visual, random_clip.visual.transformer.resblocks[-1]
    stream = torch.randn(2, 50, 768)
    with torch.no_grad():
        assert cpu_blocks.one_token_applies(last, stream)
        seen = []
        handle = last.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
        try:
            assert not cpu_blocks.one_token_applies(last, stream)
            continue_from(visual, stream, 10)
        finally:
            handle.remove()
    assert seen == [torch.Size([2, 50, 768])]


def test_a_tower_that_pools_every_token_runs_its_last_block_whole(random_clip, monkeypatch):
    visual = random_clip.visual
    stream = torch.randn(2, 50, 768, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(visual, "pool_type", "avg")
    with torch.no_grad():
        ours = continue_from(visual, stream, 10)
        monkeypatch.setattr(cpu_blocks, "one_token_applies", lambda block, x: False)
        torch.testing.assert_close(ours, continue_from(visual, stream, 10), rtol=1e-5, atol=1e-5)


def test_a_dropped_model_is_freed_at_once(monkeypatch):
    """Its blocks hold no reference cycle: a server that swaps CLIPs lets go of the old one's weights
    when it drops it, not whenever the cyclic collector next runs."""
    from clipscope.clip.loading import load_clip
    from clipscope.config import ModelConfig

    clip = load_clip(ModelConfig(pretrained="none"), "cpu")
    block = weakref.ref(clip.visual.transformer.resblocks[0])
    assert type(block()) is cpu_blocks.CpuResidualAttentionBlock
    gc.disable()
    try:
        del clip
        assert block() is None
    finally:
        gc.enable()


def test_the_patch_embedding_as_one_product_equals_the_convolution(random_clip, monkeypatch):
    conv = random_clip.visual.conv1
    products = []
    linear = gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda x, w, b: products.append(x.shape) or linear(x, w, b))
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = conv(images)
        assert products == [(3 * 49, 3 * 32 * 32)], "one product of the unfolded patches"
        expected = torch.nn.functional.conv2d(images, conv.weight, stride=32)
        assert ours.shape == expected.shape == (3, 768, 7, 7)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        products.clear()
        torch.testing.assert_close(conv(images[:, :, :200, :224]), torch.nn.functional.conv2d(images[:, :, :200, :224], conv.weight, stride=32))
        assert products == [], "an input the patches do not tile: the convolution"
    with torch.enable_grad():
        x = images.clone().requires_grad_(True)
        conv(x).sum().backward()  # autograd: the convolution
    assert products == [] and x.grad is not None
