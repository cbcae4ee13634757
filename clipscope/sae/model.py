"""TopK sparse autoencoder with a sparse latent code.

Parameters use SAELens' names and shapes so a checkpoint is a plain SAELens folder:

* ``W_enc [d_in, d_sae]`` - the study's ``encoder = Linear(d_in, d_sae, bias=False)`` (transposed);
* ``b_enc [d_sae]`` - the study's separate ``encoder_bias``, added before the ReLU;
* ``W_dec [d_sae, d_in]`` - the study's ``decoder = Linear(d_sae, d_in, bias=False)`` (transposed):
  row ``i`` of ``W_dec`` is decoder column ``i``, the dictionary atom of latent ``i``, kept unit-norm;
* ``b_dec [d_in]`` - optional pre-encoder bias: subtracted from the input, added to the output.

``z = TopK_k(ReLU((x - b_dec) W_enc + b_enc))``; ``x_hat = z W_dec + b_dec``. The code ``z`` never
materialises densely: it travels as ``(indices, values)`` and decoding touches only the k rows of
``W_dec`` it names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in), requires_grad=use_b_dec)
        self.init_weights("linear")

    @torch.no_grad()
    def init_weights(self, scheme: str = "linear", generator: torch.Generator | None = None) -> None:
        """Initialise the weights.

        ``linear``: what ``nn.Linear`` does for the study's encoder and decoder (uniform in
        ±1/sqrt(fan_in)), decoder then normalised. ``tied``: encoder as ``linear``, decoder set to
        the encoder's transpose and normalised (Gao et al. 2024). Biases start at zero.
        """
        bound_enc = 1 / math.sqrt(self.d_in)
        self.W_enc.uniform_(-bound_enc, bound_enc, generator=generator)
        if scheme == "linear":
            bound_dec = 1 / math.sqrt(self.d_sae)
            self.W_dec.uniform_(-bound_dec, bound_dec, generator=generator)
        elif scheme == "tied":
            self.W_dec.copy_(self.W_enc.T)
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.normalize_decoder_()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) W_enc + b_enc``, dense ``[batch, d_sae]``, before the ReLU."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def select(self, pre: torch.Tensor) -> SparseCode:
        """ReLU then TopK of dense pre-activations."""
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return SparseCode(indices=indices, values=F.relu(values), d_sae=self.d_sae)

    def encode(self, x: torch.Tensor) -> SparseCode:
        return self.select(self.pre_activations(x))

    def decode(self, code: SparseCode) -> torch.Tensor:
        """``z W_dec + b_dec`` reading only the k named rows of ``W_dec`` per input."""
        out = F.embedding_bag(
            code.indices, self.W_dec, per_sample_weights=code.values.to(self.W_dec.dtype), mode="sum"
        )
        return out + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
        code = self.encode(x)
        return self.decode(code), code

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
