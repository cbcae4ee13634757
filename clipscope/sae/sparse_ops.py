"""TopK encoding with a sparse backward pass.

The forward pass must compute every pre-activation (TopK needs them all), but the gradient only
reaches the selected latents: for a batch of B inputs, B * k entries out of B * d_sae. Autograd
through ``topk`` would materialise a dense ``[B, d_sae]`` gradient and a dense matrix product for
the encoder weight; here the backward touches only the selected rows of the encoder.

Optionally a second TopK over a masked copy of the same pre-activations (AuxK's dead latents) is
taken in the same pass and shares the backward.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from clipscope import gemm


_BLOCK = 8


def on_cpu(t: torch.Tensor) -> bool:
    """Whether work on ``t`` takes the paths measured fastest on the CPU. Elsewhere (a GPU) it takes
    paths that never read a value back to the host; the tests switch this off to check those
    paths' arithmetic on the CPU too."""
    return t.device.type == "cpu"


def topk_unsorted(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pre.topk(k, dim=-1, sorted=False)`` of a 2-D tensor: the same values (indices equal up to ties).

    On the CPU each row's columns are dealt into blocks of 8, and the final top-k runs only over
    the k blocks with the largest maxima. That is exact for any such partition: an entry outside
    those blocks is at most the k-th largest block maximum, and each of the k blocks holds an entry
    at least that large, so k entries tie with or beat it. A block is 8 columns a row's width / 8
    apart (column ``j`` is in block ``j % (width / 8)``), so its maxima are 7 elementwise maxima of
    contiguous stretches of the row, not a reduction over each 8 neighbours (0.9 against 3.1-5.4 ms
    at ``[128, 49152]``). At the study's shape (``[64, 49152]``, k = 500, 2 threads) the whole
    takes about half of ``torch.topk``'s time. Elsewhere (GPU, or rows too short for blocks to
    pay) it is ``torch.topk``.
    """
    batch, width = pre.shape
    blocks = width // _BLOCK
    if not on_cpu(pre) or width % _BLOCK or blocks < 2 * k:
        return pre.topk(k, dim=-1, sorted=False)
    dealt = pre.reshape(batch, _BLOCK, blocks)  # dealt[:, m, b] is column m * blocks + b
    best_blocks = dealt.amax(1).topk(k, dim=-1, sorted=False).indices
    candidates = dealt.gather(2, best_blocks[:, None, :].expand(batch, _BLOCK, k)).view(batch, _BLOCK * k)
    values, slot = candidates.topk(k, dim=-1, sorted=False)
    return values, (slot // k) * blocks + best_blocks.gather(1, slot % k)


def _aux_columns(mask: torch.Tensor, k: int) -> torch.Tensor | None:
    """On the CPU, AuxK's candidate columns when there are at least ``k`` (found once a batch, not per
    encoder chunk); None elsewhere, where their number would have to be read back to the host."""
    if not on_cpu(mask):
        return None
    columns = mask.nonzero().squeeze(1)
    return columns if len(columns) >= k else None


def _masked_topk(pre: torch.Tensor, mask: torch.Tensor, columns: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row among the columns where ``mask`` holds; slots past their count hold -inf.

    With ``columns`` (the CPU) those columns are gathered first: AuxK's dead latents are usually
    few. Without, the others are masked to -inf instead.
    """
    if columns is not None:
        values, slot = topk_unsorted(pre.index_select(1, columns), k)
        return values, columns[slot]
    return topk_unsorted(pre.masked_fill(~mask, float("-inf")), k)


_ENCODE_ROWS = 128
"""On the CPU, batches larger than twice this are encoded this many rows at a time: a chunk's
pre-activations (``[128, 49152]`` fp32, 25 MB) are still in cache when the top-k reads them, and
the whole ``[batch, d_sae]`` matrix never exists (800 MB at batch 4,096, where this saves ~10 %
of the encoder's time on 2 threads). On a GPU the batch is one product."""


def encoder_chunks(xc: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The row chunks the encoder takes its product and top-k over (see ``_ENCODE_ROWS``)."""
    return xc.split(_ENCODE_ROWS) if on_cpu(xc) and xc.shape[0] > 2 * _ENCODE_ROWS else (xc,)


def _encode(xc, weight, b_enc, k: int, aux_mask, aux_columns, k_aux: int) -> tuple[torch.Tensor, ...]:
    """``(values, indices, aux_values, aux_indices)`` before the ReLU; the aux pair is empty without a mask."""
    pre = gemm.linear(xc, weight, b_enc)
    values, indices = topk_unsorted(pre, k)
    if aux_mask is not None and k_aux > 0:
        return values, indices, *_masked_topk(pre, aux_mask, aux_columns, k_aux)
    return values, indices, values.new_zeros(xc.shape[0], 0), indices.new_zeros(xc.shape[0], 0)


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, b_enc, b_dec, k: int, aux_mask, k_aux: int, sink):
        xc = x - b_dec
        aux_columns = _aux_columns(aux_mask, k_aux) if aux_mask is not None and k_aux > 0 else None
        chunks = [_encode(rows, weight, b_enc, k, aux_mask, aux_columns, k_aux) for rows in encoder_chunks(xc)]
        values, indices, aux_values, aux_indices = chunks[0] if len(chunks) == 1 else (torch.cat(p) for p in zip(*chunks))
        values = values.clamp_min(0)
        if aux_values.shape[1]:
            aux_values = torch.where(torch.isfinite(aux_values), aux_values.clamp_min(0), torch.zeros_like(aux_values))
        ctx.set_materialize_grads(False)  # no zero tensors for the index outputs (one kernel each on a GPU)
        ctx.sink = sink
        ctx.save_for_backward(xc, weight, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, g_values, _g_indices, g_aux, _g_aux_indices):
        xc, weight, indices, values, aux_indices, aux_values = ctx.saved_tensors
        if g_values is None:  # the loss does not read the code's values
            g_values = torch.zeros_like(values)
        codes, grads = [indices], [g_values * (values > 0)]
        if aux_indices.shape[1] > 0 and g_aux is not None:  # AuxK slots the loss did not read add nothing
            codes.append(aux_indices)
            grads.append(g_aux * (aux_values > 0))
        idx, g = (codes[0], grads[0]) if len(codes) == 1 else (torch.cat(codes, dim=1), torch.cat(grads, dim=1))
        need_x, need_w, need_benc, need_bdec = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_benc = grad_bdec = None
        flat_idx = idx.reshape(-1)
        if need_w:
            # The AuxK slots count as samples of their own, beside a second copy of the inputs: a
            # latent may be in both codes of a sample, and merging such pairs would need their
            # number on the host (a GPU stall); in the stacked layout no pair repeats.
            crow, cols, order = _shared_layout(codes, weight.shape[0])
            rows = xc if len(codes) == 1 else xc.repeat(2, 1)
            by_sample = _by_latent(crow, cols, order, grads, weight.shape[0], rows.shape[0])
            if ctx.sink is not None:  # accumulate into the kept buffer; autograd gets None for the weight
                ctx.sink.accumulate_grad("encoder_weight", by_sample, rows)
            else:
                grad_w = csr_product_into(torch.zeros_like(weight), by_sample, rows)
        # b_dec's gradient is minus the input's summed over samples; without the input's, and with
        # more slots than latents, it is minus one product of each latent's summed gradient (b_enc's)
        # with the weight, which reads each row once where the decode reads one per slot (batch
        # 4,096, k = 500: 23 against 230-560 ms on 2 threads; at batch 64 the decode's 11 ms win).
        bdec_by_latent = need_bdec and not need_x and flat_idx.numel() >= weight.shape[0]
        if need_benc or bdec_by_latent:
            per_latent = torch.zeros(weight.shape[0], dtype=g.dtype, device=g.device).index_add_(0, flat_idx, g.reshape(-1))
            grad_benc = per_latent if need_benc else None
        if bdec_by_latent:
            grad_bdec = -(per_latent @ weight)
        elif need_x or need_bdec:
            grad_xc = _bag_decode(idx, g, weight)  # the encoder's rows, read as a decoder's
            grad_x = grad_xc if need_x else None
            grad_bdec = -grad_xc.sum(0) if need_bdec else None
        return grad_x, grad_w, grad_benc, grad_bdec, None, None, None, None


class _DecoderWeightGrad(torch.autograd.Function):
    """Contributes nothing to the forward values; its backward adds the decoder-weight gradient.

    The decoding path off the CPU: the decodes themselves run on the detached weight through
    ``embedding_bag`` (whose gradient for the per-sample weights is sparse), and this side branch
    supplies only the gradient of the selected rows of ``W_dec``, for every code decoded in the
    same call at once: one sparse-dense product written into the kept buffer.
    """

    @staticmethod
    def forward(ctx, W_dec, sink, *codes):  # codes: indices, values, indices, values, ...
        ctx.sink = sink
        ctx.save_for_backward(*codes)
        ctx.d_sae = W_dec.shape[0]
        return tuple(W_dec.new_zeros(indices.shape[0], W_dec.shape[1]) for indices in codes[::2])

    @staticmethod
    def backward(ctx, *g_outs):
        codes = ctx.saved_tensors
        crow, cols, order = _shared_layout(codes[::2], ctx.d_sae)
        g_out = torch.cat(g_outs)
        by_sample = _by_latent(crow, cols, order, codes[1::2], ctx.d_sae, g_out.shape[0])
        return (_write_decoder_grad(ctx.sink, by_sample, g_out), *(None,) * (1 + len(codes)))


_DECODE_LATENTS = 4096
"""On the CPU, a large batch is decoded in passes over this many latents: their atoms (12 MB at
d = 768) stay in cache while every sample's slots among them are summed, where one pass over all
the slots would fetch an atom from memory for each slot (2 M atoms of 3 KB at batch 4,096, k = 500:
335 -> 145 ms on 2 threads, 77 -> 35 ms at batch 1,024, 19 -> 13 ms at 256)."""
_DECODE_BLOCKED_ROWS = 256
"""From this batch size on, the CPU decode takes the passes of :data:`_DECODE_LATENTS` (at batch 64
the extra sort costs more than the cache saves: 5.4 -> 6.3 ms)."""


def _bag_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j values[b, j] * W_dec[indices[b, j]]``: ``embedding_bag``, or on the CPU for large batches by latent blocks."""
    if not on_cpu(W_dec) or indices.shape[0] < _DECODE_BLOCKED_ROWS or W_dec.shape[0] <= _DECODE_LATENTS:
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
    return _decode_by_blocks(indices, values, W_dec)


def _decode_by_blocks(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """:func:`_bag_decode` in passes over :data:`_DECODE_LATENTS` latents: the same sums, added in another order."""
    batch = indices.shape[0]
    blocks = -(-W_dec.shape[0] // _DECODE_LATENTS)
    block_of_slot = indices.div(_DECODE_LATENTS, rounding_mode="floor")
    # The slots run sample by sample, so a stable sort by block alone groups them by (block, sample):
    # one radix pass over int32 block numbers, 32 ms at batch 4,096 against 51 ms for the int64 key
    # block * batch + sample; and counting by scatter_add_ takes 3 ms, bincount of that key 28 ms.
    order = block_of_slot.reshape(-1).to(torch.int32).sort(stable=True).indices
    latents, weights = indices.reshape(-1).index_select(0, order), values.reshape(-1).index_select(0, order)
    ones = torch.ones(1, dtype=block_of_slot.dtype, device=block_of_slot.device).expand_as(block_of_slot)
    counts = block_of_slot.new_zeros(batch, blocks).scatter_add_(1, block_of_slot, ones).T.contiguous()  # [block, sample]
    starts = counts.cumsum(1) - counts  # each sample's first slot within its block's run
    out, begin = None, 0
    for block, n in enumerate(counts.sum(1).tolist()):
        part = F.embedding_bag(latents[begin : begin + n], W_dec, offsets=starts[block], per_sample_weights=weights[begin : begin + n], mode="sum")
        out = part if out is None else out.add_(part)
        begin += n
    return out


class _SparseDecodeCPU(torch.autograd.Function):
    """Decodes several codes in one call, with a backward built on one by-latent layout of their slots.

    The gradient of the values is a sampled product (SDDMM: for each (latent, sample) pair, the
    dot product of that atom with that sample's output gradient), which reads every selected atom
    once per batch instead of once per slot as ``embedding_bag``'s backward does: measured on 2
    CPU threads at the study's shape, about 4 ms against 8.8 ms at batch 64 and 82 ms against 535 ms
    at batch 4,096. The decoder-weight gradient (when ``W_dec`` trains) reuses the same layout.
    """

    @staticmethod
    def forward(ctx, W_dec, sink, *codes):
        ctx.sink = sink
        ctx.save_for_backward(W_dec, *codes)
        return tuple(_bag_decode(indices, values, W_dec) for indices, values in zip(codes[::2], codes[1::2]))

    @staticmethod
    def backward(ctx, *g_outs):
        W_dec, *codes = ctx.saved_tensors
        indices, values = codes[::2], codes[1::2]
        d_sae = W_dec.shape[0]
        crow, cols, order = _shared_layout(indices, d_sae)
        g_out = torch.cat(g_outs)
        grads: list[torch.Tensor | None] = [None] * (2 + len(codes))
        if any(ctx.needs_input_grad[3::2]):
            pattern = _csr(crow, cols, g_out.new_zeros(len(cols)), d_sae, g_out.shape[0])
            by_pair = torch.sparse.sampled_addmm(pattern, W_dec, g_out.T, beta=0).values()
            flat = torch.empty_like(by_pair).index_copy_(0, order, by_pair)
            start = 0
            for i, v in enumerate(values):
                grads[3 + 2 * i] = flat[start : start + v.numel()].view_as(v)
                start += v.numel()
        if ctx.needs_input_grad[0]:
            by_sample = _by_latent(crow, cols, order, values, d_sae, g_out.shape[0])
            grads[0] = _write_decoder_grad(ctx.sink, by_sample, g_out)
        return tuple(grads)


def _write_decoder_grad(sink, by_sample: torch.Tensor, g_out: torch.Tensor) -> torch.Tensor | None:
    """``by_sample @ g_out``: added into the sink's kept buffer (returns None for autograd), or returned."""
    if sink is not None:
        sink.accumulate_grad("W_dec", by_sample, g_out)
        return None
    return csr_product_into(g_out.new_zeros(by_sample.shape[0], g_out.shape[1]), by_sample, g_out)


_BAG_PRODUCT_SAMPLES = 2048
"""On the CPU, from this many samples (rows of the dense operand) on, :func:`csr_product_into` sums
by ``embedding_bag`` instead of MKL's CSR product, whose time grows faster than its work: at
``[49152, n] x [n, 768]`` with 500 entries a sample (2 threads, AMD EPYC with AVX2), 0.14-0.25 s
against 0.43-1.36 s at 4,096 samples and 0.45-0.54 s against 1.3-2.9 s at 8,192 (the topk recipe's
stacked AuxK samples), about equal at 1,024, and MKL's faster below (0.01 against 0.02-0.03 s at 64)."""
_BAG_PRODUCT_BYTES = 24 << 20
"""Rows of the product :func:`csr_product_into` sums per ``embedding_bag`` call, in bytes of its
output (8,192 latents at d = 768): each block is summed into a fresh tensor small enough for the
allocator to reuse (a 150 MB one costs ~70 ms of page faults a call) and copied while in cache."""


def csr_product_into(out: torch.Tensor, by_sample: torch.Tensor, dense: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """``out = by_sample @ dense`` (``out += ...`` with ``accumulate``) for a CSR ``by_sample`` ``[rows, n]``
    with int64 indices and a dense ``[n, width]``, into ``out`` ``[rows, width]``.

    Every row of ``out`` is written; its old values count only with ``accumulate``. On the CPU with
    many samples (see :data:`_BAG_PRODUCT_SAMPLES`) each row of ``by_sample`` is one bag of
    ``embedding_bag`` over ``dense``'s rows: the same sums, added in another order.
    """
    if not on_cpu(dense) or dense.shape[0] < _BAG_PRODUCT_SAMPLES:
        return out.addmm_(by_sample, dense, beta=1 if accumulate else 0)
    crow, cols, values = by_sample.crow_indices(), by_sample.col_indices(), by_sample.values()
    rows = by_sample.shape[0]
    block = max(1, _BAG_PRODUCT_BYTES // (dense.shape[1] * dense.element_size()))
    starts = range(0, rows, block)
    bounds = crow[[*starts, rows]].tolist()  # each block's first entry, and the end
    for r0, begin, end in zip(starts, bounds, bounds[1:]):
        r1 = min(r0 + block, rows)
        part = F.embedding_bag(cols[begin:end], dense, offsets=crow[r0:r1] - begin, per_sample_weights=values[begin:end], mode="sum")
        if accumulate:
            out[r0:r1].add_(part)
        else:
            out[r0:r1].copy_(part)
    return out


def sparse_decode(
    codes: list[tuple[torch.Tensor, torch.Tensor]], W_dec: torch.Tensor, sink=None
) -> list[torch.Tensor]:
    """``sum_j values[b, j] * W_dec[indices[b, j]]`` for each ``(indices, values)`` code.

    The backward reads and writes only the named rows; codes decoded in one call share one
    by-latent layout (and one product for the decoder-weight gradient). On the CPU the values'
    gradient is an SDDMM (:class:`_SparseDecodeCPU`); elsewhere, where that has not been measured
    yet, it is ``embedding_bag``'s own backward.
    """
    if on_cpu(W_dec):
        return _decode_sddmm(codes, W_dec, sink)
    return _decode_embedding_bag(codes, W_dec, sink)


def _decode_sddmm(codes, W_dec: torch.Tensor, sink) -> list[torch.Tensor]:
    if not torch.is_grad_enabled() or not (W_dec.requires_grad or any(v.requires_grad for _, v in codes)):
        return [_bag_decode(indices, values, W_dec) for indices, values in codes]
    return list(_SparseDecodeCPU.apply(W_dec, sink, *(t for code in codes for t in code)))


def _decode_embedding_bag(codes, W_dec: torch.Tensor, sink) -> list[torch.Tensor]:
    trains_w = W_dec.requires_grad and torch.is_grad_enabled()
    weight = W_dec.detach() if trains_w else W_dec
    outs = [F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum") for indices, values in codes]
    if trains_w:
        # the index tensors themselves: the encoder's backward pass finds their layout by identity
        detached = [t for indices, values in codes for t in (indices, values.detach())]
        outs = [out + side for out, side in zip(outs, _DecoderWeightGrad.apply(W_dec, sink, *detached))]
    return outs


@functools.lru_cache(maxsize=8)
def _samples_of_slots(batch: int, slots: int, device: torch.device) -> torch.Tensor:
    """For ``[batch, slots]`` indices, the sample (row) of every flattened slot. Kept per shape (read-only),
    as the shapes repeat every step: on a GPU each rebuild is kernels the host must launch."""
    return torch.arange(batch, device=device).repeat_interleave(slots)


@functools.lru_cache(maxsize=8)
def _row_bounds(d_sae: int, device: torch.device) -> torch.Tensor:
    """The latents ``0 .. d_sae`` as int32, the first key of every CSR row (read-only: kept per shape)."""
    return torch.arange(d_sae + 1, dtype=torch.int32, device=device)


def _latent_layout(indices: list[torch.Tensor], d_sae: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slots of ``[batch_i, slots_i]`` codes stacked by sample, ordered by latent: CSR ``(crow, cols)`` of
    the ``[d_sae, sum batch_i]`` pattern, and ``order``, the flattened slot at each position.

    A latent is distinct within a row of one code, and each code has its own samples, so no
    (latent, sample) pair repeats. The slots run sample by sample, so a stable sort by latent alone
    leaves each latent's samples in order: on the CPU torch sorts such integers by radix, and int32
    latents (16 bits at 49,152) take half the passes of the int64 key ``latent * samples + sample``
    (28 bits at batch 4,096), where the whole layout takes 46 ms against 89 ms (3.1 -> 2.9 ms at 64).
    """
    latents = torch.cat([i.reshape(-1) for i in indices])
    sorted_latents, order = torch.sort(latents.to(torch.int32), stable=True)
    if len(indices) == 1 and indices[0].shape[1] > 0:
        cols = order.div(indices[0].shape[1], rounding_mode="floor")
    else:
        samples, offset = [], 0
        for i in indices:
            samples.append(_samples_of_slots(*i.shape, i.device) + offset)
            offset += i.shape[0]
        cols = torch.cat(samples).index_select(0, order)
    return _crow(sorted_latents, d_sae), cols, order


_kept_layout: tuple | None = None
"""``(key, index tensors, layout)``: the layout :func:`_shared_layout` built last, until it is asked for again."""


def _shared_layout(indices: list[torch.Tensor], d_sae: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_latent_layout`, built once for two backward passes over the same codes.

    In a training step the decoder's backward pass and then the encoder's ask for the layout of the
    same index tensors (the TopK code, and AuxK's in the topk recipe): the first builds and keeps
    it, the second takes it (and the memo is emptied). Matched by each tensor's identity and
    in-place version; the kept tensors cannot be freed meanwhile, so no new tensor takes an id.
    """
    global _kept_layout
    key = (d_sae, *((id(i), i._version) for i in indices))
    kept = _kept_layout
    if kept is not None and kept[0] == key:
        _kept_layout = None
        return kept[2]
    layout = _latent_layout(indices, d_sae)
    _kept_layout = (key, tuple(indices), layout)
    return layout


def _crow(sorted_latents: torch.Tensor, d_sae: int) -> torch.Tensor:
    """CSR row pointers of the sorted latents.

    On the CPU by counting; elsewhere by binary search, because ``bincount`` reads the largest key
    back to the host to size its output, which would stall a GPU every step (``searchsorted``
    takes ~5x ``bincount``'s time on the CPU at batch 64, 0.75 ms against 0.16 ms).
    """
    if not on_cpu(sorted_latents):
        return torch.searchsorted(sorted_latents, _row_bounds(d_sae, sorted_latents.device))
    crow = torch.zeros(d_sae + 1, dtype=torch.long)
    crow[1:] = torch.bincount(sorted_latents, minlength=d_sae).cumsum(0)
    return crow


def _by_latent(
    crow: torch.Tensor, cols: torch.Tensor, order: torch.Tensor, per_slot: list[torch.Tensor], d_sae: int, n_samples: int
) -> torch.Tensor:
    """The CSR ``[d_sae, n_samples]`` of a layout whose values are ``per_slot`` (one tensor per code, shaped as
    its indices), taken in the layout's order."""
    return _csr(crow, cols, torch.cat([t.reshape(-1) for t in per_slot]).index_select(0, order), d_sae, n_samples)


def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, d_sae: int, n_samples: int) -> torch.Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": used only in sparse products supported on CPU and CUDA
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, (d_sae, n_samples), check_invariants=False)


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
    the weight gradient is added into its kept buffer (``sink.accumulate_grad``) rather
    than returned as a freshly allocated dense tensor each step.
    """
    return _TopKEncode.apply(x, weight, b_enc, b_dec, k, aux_mask, k_aux, sink)
