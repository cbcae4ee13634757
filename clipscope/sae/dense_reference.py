"""The same SAE maths written the straightforward way: dense code, dense decoder, autograd everywhere.

Not used for training. It is the reference that tests compare the sparse implementation against
(equal results to float tolerance) and that ``bench/train_step.py`` measures speed against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipscope.sae.model import SparseCode, TopKSAE


class DenseTopKSAE(TopKSAE):
    def encode(self, x: torch.Tensor) -> SparseCode:
        values, indices = self.pre_activations(x).topk(self.k, dim=-1, sorted=False)
        return SparseCode(indices, F.relu(values), self.d_sae)

    def encode_with_aux(self, x: torch.Tensor, aux_mask: torch.Tensor, k_aux: int) -> tuple[SparseCode, SparseCode]:
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        aux_values, aux_indices = pre.masked_fill(~aux_mask, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        aux_values = torch.where(torch.isfinite(aux_values), F.relu(aux_values), torch.zeros_like(aux_values))
        return SparseCode(indices, F.relu(values), self.d_sae), SparseCode(aux_indices, aux_values, self.d_sae)

    def decode_codes(self, *codes: SparseCode) -> list[torch.Tensor]:
        return [code.to_dense() @ self.W_dec for code in codes]

    def zero_grad_(self) -> None:
        for p in self.parameters():
            p.grad = None
