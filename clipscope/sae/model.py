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
import torch.nn.functional as F
from torch import nn

from clipscope.sae.sparse_ops import sparse_decode, topk_encode


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
        self._grad_rows: dict[str, list[torch.Tensor]] = {}  # per kept gradient: rows written since the last zeroing
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
        return F.linear(x - self.b_dec, self.encoder_weight, self.b_enc)

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
        out = sparse_decode(code.indices, code.values.to(self.W_dec.dtype), self.W_dec, sink=self)
        return out + self.b_dec if bias else out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
        code = self.encode(x)
        return self.decode(code), code

    @torch.no_grad()
    def accumulate_grad(self, name: str, by_sample: torch.Tensor, dense: torch.Tensor, rows: torch.Tensor) -> None:
        """``param.grad += by_sample @ dense`` for ``encoder_weight`` or ``W_dec``, touching only ``rows``.

        The gradient buffer is kept between steps (see :meth:`zero_grad_`), so a step allocates no
        ``[d_sae, d_in]`` tensor (150 MB at the study's shape) and pays no page faults for one.
        """
        param = getattr(self, name)
        if param.grad is None:
            param.grad = torch.zeros_like(param)
            self._grad_rows[name] = []
        param.grad.addmm_(by_sample, dense)
        if name in self._grad_rows:
            self._grad_rows[name].append(rows)

    def zero_grad_(self) -> None:
        """What ``optimizer.zero_grad(set_to_none=True)`` does, except that the kept buffers of
        ``encoder_weight`` and ``W_dec`` are zeroed in place, only where written when that is cheaper."""
        for name in ("encoder_weight", "W_dec"):
            grad, written = getattr(self, name).grad, self._grad_rows.get(name)
            if grad is None:
                continue
            if written is None:  # written by something else: drop it like autograd's zero_grad would
                getattr(self, name).grad = None
                continue
            if written:
                rows = torch.cat(written).unique()
                if 4 * len(rows) > self.d_sae:  # past a quarter of the rows a plain fill is faster
                    grad.zero_()
                else:
                    grad.index_fill_(0, rows, 0.0)
            self._grad_rows[name] = []
        for p in (self.b_enc, self.b_dec):
            p.grad = None

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every dictionary atom (row of ``W_dec``) to unit length."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Drop the gradient component along each (unit) atom, so a step cannot change its norm to first order."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)
