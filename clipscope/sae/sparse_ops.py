"""TopK encoding with a sparse backward pass.

The forward pass must compute every pre-activation (TopK needs them all), but the gradient only
reaches the selected latents: for a batch of B inputs, B * k entries out of B * d_sae. Autograd
through ``topk`` would materialise a dense ``[B, d_sae]`` gradient and a dense matrix product for
the encoder weight; here the backward touches only the selected rows of the encoder.

Optionally a second TopK over a masked copy of the same pre-activations (AuxK's dead latents) is
taken in the same pass and shares the backward.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, b_enc, b_dec, k: int, aux_mask, k_aux: int, sink):
        xc = x - b_dec
        pre = F.linear(xc, weight, b_enc)
        values, indices = pre.topk(k, dim=-1, sorted=False)
        values = values.clamp_min(0)
        if aux_mask is not None and k_aux > 0:
            aux_pre = pre.masked_fill(~aux_mask, float("-inf"))
            aux_values, aux_indices = aux_pre.topk(k_aux, dim=-1, sorted=False)
            aux_values = torch.where(torch.isfinite(aux_values), aux_values.clamp_min(0), torch.zeros_like(aux_values))
        else:
            aux_values = values.new_zeros(x.shape[0], 0)
            aux_indices = indices.new_zeros(x.shape[0], 0)
        ctx.sink = sink
        ctx.save_for_backward(xc, weight, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, g_values, _g_indices, g_aux, _g_aux_indices):
        xc, weight, indices, values, aux_indices, aux_values = ctx.saved_tensors
        g = g_values * (values > 0)
        idx = indices
        if aux_indices.shape[1] > 0:
            g = torch.cat([g, g_aux * (aux_values > 0)], dim=1)
            idx = torch.cat([indices, aux_indices], dim=1)
        need_x, need_w, need_benc, need_bdec = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_benc = grad_bdec = None
        flat_idx = idx.reshape(-1)
        if need_w:
            by_sample = _latent_by_sample(idx, g, weight.shape[0])
            if ctx.sink is not None:  # accumulate into the kept buffer; autograd gets None for the weight
                ctx.sink.accumulate_grad("encoder_weight", by_sample, xc, flat_idx)
            else:
                grad_w = torch.zeros_like(weight).addmm_(by_sample, xc)
        if need_benc:
            grad_benc = torch.zeros(weight.shape[0], dtype=g.dtype, device=g.device).index_add_(0, flat_idx, g.reshape(-1))
        if need_x or need_bdec:
            grad_xc = F.embedding_bag(idx, weight, per_sample_weights=g, mode="sum")
            grad_x = grad_xc if need_x else None
            grad_bdec = -grad_xc.sum(0) if need_bdec else None
        return grad_x, grad_w, grad_benc, grad_bdec, None, None, None, None


class _DecoderWeightGrad(torch.autograd.Function):
    """Contributes nothing to the forward value; its backward adds the decoder-weight gradient.

    The decode itself runs on the detached weight through ``embedding_bag`` (whose gradient for
    the per-sample weights is already sparse and fast); this side branch supplies only what that
    leaves out, the gradient of the k selected rows of ``W_dec``, written into the kept buffer.
    """

    @staticmethod
    def forward(ctx, W_dec, indices, values, sink):
        ctx.sink = sink
        ctx.save_for_backward(indices, values)
        ctx.d_sae = W_dec.shape[0]
        return W_dec.new_zeros(indices.shape[0], W_dec.shape[1])

    @staticmethod
    def backward(ctx, g_out):
        indices, values = ctx.saved_tensors
        by_sample = _latent_by_sample(indices, values, ctx.d_sae)
        if ctx.sink is not None:
            ctx.sink.accumulate_grad("W_dec", by_sample, g_out, indices.reshape(-1))
            return None, None, None, None
        return torch.sparse.mm(by_sample, g_out), None, None, None


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, sink=None) -> torch.Tensor:
    """``sum_j values[b, j] * W_dec[indices[b, j]]``; the backward reads and writes only those rows."""
    trains_w = W_dec.requires_grad and torch.is_grad_enabled()
    out = F.embedding_bag(indices, W_dec.detach() if trains_w else W_dec, per_sample_weights=values, mode="sum")
    if trains_w:
        out = out + _DecoderWeightGrad.apply(W_dec, indices, values.detach(), sink)
    return out


def _latent_by_sample(idx: torch.Tensor, g: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The sparse ``[d_sae, batch]`` matrix with ``g[b, j]`` at ``(idx[b, j], b)`` (duplicates summed), as CSR.

    ``grad_weight = this @ (x - b_dec)`` is then one sparse-dense product that reads only the
    selected latents, instead of a dense ``[batch, d_sae]`` gradient times ``x``.
    """
    batch, slots = idx.shape
    rows = torch.arange(batch, device=idx.device).repeat_interleave(slots)
    key = idx.reshape(-1) * batch + rows
    order = torch.argsort(key)
    uniq, inverse = torch.unique_consecutive(key[order], return_inverse=True)
    values = torch.zeros(len(uniq), dtype=g.dtype, device=g.device).index_add_(0, inverse, g.reshape(-1)[order])
    latent = uniq // batch
    crow = torch.zeros(d_sae + 1, dtype=torch.long, device=idx.device)
    crow[1:] = torch.bincount(latent, minlength=d_sae).cumsum(0)
    with warnings.catch_warnings():  # "CSR support is in beta": used only as addmm_'s left operand, supported on CPU and CUDA
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, uniq % batch, values, (d_sae, batch), check_invariants=False)


def topk_encode(
    x: torch.Tensor,
    weight: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    aux_mask: torch.Tensor | None = None,
    k_aux: int = 0,
    sink=None,
):
    """``(values, indices, aux_values, aux_indices)`` of ``TopK(ReLU(F.linear(x - b_dec, weight, b_enc)))``.

    ``weight`` is ``[d_sae, d_in]``. The aux pair holds the top ``k_aux`` latents among ``aux_mask``
    (empty when no mask is given); values of masked-out slots are zero. With a ``sink`` (the SAE),
    the weight gradient is added into its kept buffer (``sink.accumulate_encoder_grad``) rather
    than returned as a freshly allocated dense tensor each step.
    """
    return _TopKEncode.apply(x, weight, b_enc, b_dec, k, aux_mask, k_aux, sink)
