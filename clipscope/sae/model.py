"""TopK sparse autoencoder with a sparse latent code.

Parameters follow the study and SAELens (a checkpoint is a plain SAELens folder):

* ``encoder_weight [d_sae, d_in]`` - the study's ``encoder = Linear(d_in, d_sae, bias=False)``
  weight; SAELens' ``W_enc [d_in, d_sae]`` is its transpose (``W_enc`` property, and on disk);
* ``b_enc [d_sae]`` - the study's separate ``encoder_bias``, added before the ReLU;
* ``W_dec [d_sae, d_in]`` - the study's ``decoder = Linear(d_sae, d_in, bias=False)`` (transposed):
  row ``i`` of ``W_dec`` is decoder column ``i``, the dictionary atom of latent ``i``, kept unit-norm;
* ``b_dec [d_in]`` - optional pre-encoder bias: subtracted from the input, added to the output.

``z = TopK_k(ReLU((x - b_dec) W_enc + b_enc))``; ``x_hat = z W_dec + b_dec``. The code ``z`` never
materialises densely: it travels as ``(indices, values)``, decoding touches only the k rows of
``W_dec`` it names, and the encoder's backward only the k selected rows of ``encoder_weight``
(:mod:`clipscope.sae.sparse_ops`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from clipscope import gemm
from clipscope.sae.sparse_ops import csr_product_into, sparse_decode, topk_encode


@dataclass
class SparseCode:
    """The k active latents of each input: ``indices`` and ``values``, both ``[batch, k]``.

    ``values`` may hold zeros (TopK of a ReLU output when fewer than k pre-activations are positive).
    """

    indices: torch.Tensor
    values: torch.Tensor
    d_sae: int

    def l0(self) -> torch.Tensor:
        """Number of non-zero latents per input, ``[batch]``."""
        return (self.values > 0).sum(dim=-1)

    def rows(self, start: int, stop: int) -> "SparseCode":
        """The code of inputs ``start .. stop - 1`` (views, no copy)."""
        return SparseCode(self.indices[start:stop], self.values[start:stop], self.d_sae)

    def to_dense(self) -> torch.Tensor:
        dense = self.values.new_zeros(self.values.shape[0], self.d_sae)
        return dense.scatter_(1, self.indices, self.values)


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, use_b_dec: bool = True):
        super().__init__()
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must be in 1..d_sae ({d_sae}), got {k}")
        self.d_in, self.d_sae, self.k, self.use_b_dec = d_in, d_sae, k, use_b_dec
        self.encoder_weight = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in), requires_grad=use_b_dec)
        self._grad_buffers: dict[str, torch.Tensor] = {}  # gradient memory reused across steps (zero_grad_)
        self.init_weights("linear")

    @property
    def W_enc(self) -> torch.Tensor:
        """SAELens' ``W_enc [d_in, d_sae]`` (a transposed view of ``encoder_weight``)."""
        return self.encoder_weight.T

    @torch.no_grad()
    def init_weights(self, scheme: str = "linear", generator: torch.Generator | None = None) -> None:
        """Initialise the weights.

        ``linear``: what ``nn.Linear`` does for the study's encoder and decoder (uniform in
        ±1/sqrt(fan_in)), decoder then normalised. ``tied``: encoder as ``linear``, decoder set to
        the encoder's transpose and normalised (Gao et al. 2024). Biases start at zero.
        """
        bound_enc = 1 / math.sqrt(self.d_in)
        self.encoder_weight.uniform_(-bound_enc, bound_enc, generator=generator)
        if scheme == "linear":
            bound_dec = 1 / math.sqrt(self.d_sae)
            self.W_dec.uniform_(-bound_dec, bound_dec, generator=generator)
        elif scheme == "tied":
            self.W_dec.copy_(self.encoder_weight)
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.normalize_decoder_()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) W_enc + b_enc``, dense ``[batch, d_sae]``, before the ReLU."""
        return gemm.linear(x - self.b_dec, self.encoder_weight, self.b_enc)

    def encode(self, x: torch.Tensor) -> SparseCode:
        """TopK of the ReLU'd pre-activations (ReLU and TopK commute), with a sparse backward."""
        values, indices, _, _ = topk_encode(x, self.encoder_weight, self.b_enc, self.b_dec, self.k, sink=self)
        return SparseCode(indices=indices, values=values, d_sae=self.d_sae)

    def encode_with_aux(self, x: torch.Tensor, aux_mask: torch.Tensor, k_aux: int) -> tuple[SparseCode, SparseCode]:
        """The code plus the top ``k_aux`` latents among ``aux_mask`` (AuxK), from one encoder pass."""
        values, indices, aux_values, aux_indices = topk_encode(
            x, self.encoder_weight, self.b_enc, self.b_dec, self.k, aux_mask, k_aux, sink=self
        )
        return SparseCode(indices, values, self.d_sae), SparseCode(aux_indices, aux_values, self.d_sae)

    def decode(self, code: SparseCode, bias: bool = True) -> torch.Tensor:
        """``z W_dec (+ b_dec)`` reading only the k named rows of ``W_dec`` per input."""
        out = self.decode_codes(code)[0]
        return out + self.b_dec if bias else out

    def decode_codes(self, *codes: SparseCode) -> list[torch.Tensor]:
        """``z W_dec`` (no bias) of each code; their decoder-weight gradients are computed together."""
        return sparse_decode([(c.indices, c.values.to(self.W_dec.dtype)) for c in codes], self.W_dec, sink=self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
        code = self.encode(x)
        return self.decode(code), code

    @torch.no_grad()
    def accumulate_grad(self, name: str, by_sample: torch.Tensor, dense: torch.Tensor) -> None:
        """``param.grad += by_sample @ dense`` for ``encoder_weight`` or ``W_dec`` (``by_sample`` sparse CSR).

        When the gradient is unset (after :meth:`zero_grad_`) the product is written straight into
        the buffer kept from the last step (:func:`csr_product_into` without ``accumulate``: every row
        written once, old values never read), so a step neither allocates a ``[d_sae, d_in]`` tensor
        (150 MB at the study's shape) nor spends a pass zeroing one.
        """
        param = getattr(self, name)
        if param.grad is not None:
            csr_product_into(param.grad, by_sample, dense, accumulate=True)
            return
        buffer = self._grad_buffers.get(name)
        if buffer is None or buffer.shape != param.shape or buffer.dtype != param.dtype or buffer.device != param.device:
            buffer = torch.zeros_like(param)  # zeros, not empty: a gradient never starts from fresh memory's NaN
        param.grad = csr_product_into(buffer, by_sample, dense)

    def zero_grad_(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)``, keeping the dense gradients of ``encoder_weight``
        and ``W_dec`` aside for :meth:`accumulate_grad` to overwrite in the next backward pass."""
        for name in ("encoder_weight", "W_dec"):
            grad = getattr(self, name).grad
            if grad is not None and not grad.is_sparse:
                self._grad_buffers[name] = grad
        for p in self.parameters():
            p.grad = None

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every dictionary atom (row of ``W_dec``) to unit length."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self, chunk_rows: int = 4096) -> None:
        """Drop the gradient component along each (unit) atom, so a step cannot change its norm to first order.

        Done in chunks of rows that stay in cache between the dot products and the update: 3-4x
        faster than whole-matrix temporaries on the CPU at the study's shape.
        """
        grad = self.W_dec.grad
        if grad is None:
            return
        for start in range(0, self.d_sae, chunk_rows):
            g, w = grad[start : start + chunk_rows], self.W_dec[start : start + chunk_rows]
            g.addcmul_((g * w).sum(dim=1, keepdim=True), w, value=-1)
