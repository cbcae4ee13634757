"""open_clip's residual attention blocks and patch embedding for fp32 inference on the CPU, their products through oneDNN.

Run as open_clip wrote it, a block's four dense products (attention's packed QKV and output
projections, the MLP's two layers) go through ``F.linear`` to MKL, which takes its generic code path
on the AMD CPUs this project runs on; they are ~85 % of CLIP's forward time on the CPU.
:func:`forward` computes the same block, ``x + ls_1(attn(ln_1(x))) + ls_2(mlp(ln_2(.)))``, with
those products through :func:`clipscope.gemm.linear` (oneDNN) and attention through
``F.scaled_dot_product_attention``: CLIP's image tower to block 10 runs 1.3-1.8x faster for one
image and 1.2-1.4x at extraction's batches, its text tower 1.4-1.5x (``bench/clip_forward.py``),
equal to float rounding
(``tests/clipscope/test_cpu_blocks.py``).

:func:`install` makes each plain block of a model a :class:`CpuResidualAttentionBlock`, whose
forward takes this path where it :func:`applies` and is open_clip's otherwise (a GPU, another dtype
or autocast, autograd, the ``mkl`` kernel setting). ``load_clip`` installs it, so every CLIP forward
ClipScope runs (extraction, evaluation, analysis, the zero-shot prompts) takes it on the CPU. Hooks
on a block still fire: the module is called as before, only its forward changed.

``forward(..., token=0)`` computes the block's output at one token alone, for a tower's last block,
whose other outputs its pooling never reads (where :func:`one_token_applies`): the image tower's
CLS token (``hooks.continue_from``: the rest of the tower from block 10 runs ~4x faster, which is
what evaluation's four conditions, an explanation's measured features and steering run), and the
text tower's end-of-text token, the last of prompts grouped by length
(``zeroshot.TrimmedPrompts``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from clipscope import gemm


def plain(block: nn.Module) -> bool:
    """A block whose computation :func:`forward` restates exactly: open_clip's own class, self-attention
    through ``nn.MultiheadAttention`` with packed projections and no extra key/value biases, and a
    ``c_fc``, ``gelu``, ``c_proj`` MLP."""
    if type(block) not in (ResidualAttentionBlock, CpuResidualAttentionBlock) or hasattr(block, "ln_1_kv"):
        return False
    attn, mlp = block.attn, block.mlp
    return (type(attn) is nn.MultiheadAttention and attn.batch_first and attn._qkv_same_embed_dim
            and attn.bias_k is None and not attn.add_zero_attn
            and isinstance(mlp, nn.Sequential) and list(mlp._modules) == ["c_fc", "gelu", "c_proj"]
            and all(type(mlp._modules[name]) is nn.Linear for name in ("c_fc", "c_proj")))


def _on_cpu_in_fp32(block: nn.Module, x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 3
            and not torch.is_autocast_enabled("cpu") and gemm.cpu_kernel() == "onednn"
            and not (block.training and block.attn.dropout > 0))


def applies(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`forward` runs a :func:`plain` ``block`` on ``x`` (``[batch, tokens, width]``)."""
    return _on_cpu_in_fp32(block, x) and not gemm.needs_graph(x, *block.parameters())


def one_token_applies(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``forward(block, x, token=...)`` may stand for the block's call when only its output at
    that token is read (a tower's last block, before a pooling that reads one token): a :func:`plain`
    block on the CPU in fp32, with no hook to miss. Autograd may record it (its products then run
    through ``F.linear``): an explanation's backward pass then runs one token through the MLP, not 50."""
    return plain(block) and _on_cpu_in_fp32(block, x) and not _hooked(block)


def _hooked(module: nn.Module) -> bool:
    """Whether a hook would see a call of ``module`` or of one of its children."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def forward(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None, token: int | torch.Tensor | None = None,
            shared_rest: bool = False) -> torch.Tensor:
    """``block(x, attn_mask=attn_mask)`` for a :func:`plain` block and a batch-first ``x``; ``attn_mask``
    is added to the attention scores, as open_clip passes it (the text tower's causal mask). With a
    ``token`` (0 the first, -1 the last, or a position per row), only that token's output,
    ``[batch, 1, width]``: its query attends to the tokens its row of the mask lets it see, and the
    rest of the block runs on that token alone.

    ``shared_rest`` (with an int ``token``): every row of ``x`` equals the first outside ``token`` (copies
    of one stream edited at that token), so the keys and values there are computed once, from the first
    row: the QKV product runs on ``tokens + batch - 1`` rows instead of ``batch * tokens``. Not where
    autograd records ``x``, whose other rows would then get no gradient there."""
    attn, mlp = block.attn, block.mlp
    batch, tokens, width = x.shape
    heads = attn.num_heads
    if shared_rest and isinstance(token, int) and not (torch.is_grad_enabled() and x.requires_grad):
        t = token % tokens
        qkv = gemm.linear(block.ln_1(torch.cat([x[0], x[1:, t]])), attn.in_proj_weight, attn.in_proj_bias)
        rest, own = qkv[None, :tokens].expand(batch, -1, -1), torch.cat([qkv[t : t + 1], qkv[tokens:]])[:, None]
        qkv = torch.cat([rest[:, :t], own, rest[:, t + 1 :]], 1)  # each row's own token among the shared ones
    else:
        qkv = gemm.linear(block.ln_1(x).reshape(batch * tokens, width), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    mask = attn_mask.to(x.dtype) if attn_mask is not None else None
    if isinstance(token, int):
        one = slice(token, token + 1 or None)
        q, x, mask, tokens = q[:, :, one], x[:, one], mask[one] if mask is not None else None, 1
    elif token is not None:  # each row's own position
        rows = torch.arange(batch, device=x.device)
        q, x, tokens = q[rows, :, token].unsqueeze(2), x[rows, token].unsqueeze(1), 1
        mask = mask[token][:, None, None, :] if mask is not None else None
    mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(batch * tokens, width)
    x = x + block.ls_1(gemm.linear(mixed, attn.out_proj.weight, attn.out_proj.bias).view(batch, tokens, width))
    hidden = mlp.gelu(gemm.linear(block.ln_2(x).reshape(batch * tokens, width), mlp.c_fc.weight, mlp.c_fc.bias))
    return x + block.ls_2(gemm.linear(hidden, mlp.c_proj.weight, mlp.c_proj.bias).view(batch, tokens, width))


class CpuResidualAttentionBlock(ResidualAttentionBlock):
    """open_clip's block, its forward taking :func:`forward` where it :func:`applies` (:func:`install`).
    A subclass rather than a forward set on the instance: that would make each block a reference
    cycle, kept in memory after its model is dropped until the cyclic collector runs."""

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if k_x is None and v_x is None and applies(self, q_x):
            return forward(self, q_x, attn_mask)
        return super().forward(q_x, k_x, v_x, attn_mask)


class CpuPatchEmbedding(nn.Conv2d):
    """The image tower's patch embedding (``conv1``: a convolution whose stride is its kernel), as one
    product of the unfolded patches with the flattened kernel through :func:`clipscope.gemm.linear`
    on the CPU in fp32 without autograd: the same sums, 2-3x faster than ``conv2d`` for one image and
    1.3x at batches of 8 and 64 (docs/benchmarks.md). Its output is a view shaped as ``conv2d``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_patches_apply(self, x) and not gemm.needs_graph(x, self.weight, self.bias)):
            return super().forward(x)
        batch, channels, height, width = x.shape
        (rows, cols), out = self.kernel_size, self.out_channels
        grid_h, grid_w = height // rows, width // cols
        patches = x.reshape(batch, channels, grid_h, rows, grid_w, cols).permute(0, 2, 4, 1, 3, 5).reshape(batch * grid_h * grid_w, -1)
        return gemm.linear(patches, self.weight.reshape(out, -1), self.bias).view(batch, grid_h, grid_w, out).permute(0, 3, 1, 2)


def _patches_apply(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """A convolution over whole, disjoint patches of a 4-D fp32 CPU input that tiles exactly."""
    return (conv.stride == conv.kernel_size and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and x.dim() == 4 and x.device.type == "cpu" and x.dtype == conv.weight.dtype == torch.float32
            and x.shape[2] % conv.kernel_size[0] == 0 and x.shape[3] % conv.kernel_size[1] == 0
            and not torch.is_autocast_enabled("cpu") and gemm.cpu_kernel() == "onednn")


def install(model: nn.Module) -> int:
    """Make every :func:`plain` block of ``model`` a :class:`CpuResidualAttentionBlock` and an image tower's
    patch embedding (``conv1``) a :class:`CpuPatchEmbedding` (same parameters, same module tree); returns
    how many changed. Installing twice changes nothing more."""
    installed = 0
    for module in model.modules():
        if type(module) is ResidualAttentionBlock and plain(module):
            module.__class__ = CpuResidualAttentionBlock
            installed += 1
        elif isinstance(module, VisionTransformer) and type(module.conv1) is nn.Conv2d:
            module.conv1.__class__ = CpuPatchEmbedding
            installed += 1
    return installed
