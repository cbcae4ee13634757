"""Reconstruction metrics, each defined once here (the README quotes these definitions).

* EVR (explained variance ratio) = 1 - sum_i Var(x_i - x_hat_i) / sum_i Var(x_i), where i runs over
  the input dimensions and each variance is taken over samples (population variance; the ddof
  cancels in the ratio). Computed on held-out data.
* MSE = mean over samples and dimensions of (x - x_hat)^2.
* L0 = mean number of non-zero latents per sample (never above k).
* Dead fraction = share of latents that did not fire in the last ``dead_after`` training samples.

Accumulation is streaming in float64, so any number of samples fits in memory.
"""

from __future__ import annotations

import torch

from clipscope.sae.model import SparseCode


class ReconstructionStats:
    """Running sums on the data's device; reading a metric is the only host synchronisation."""

    def __init__(self, d_in: int, device: str | torch.device = "cpu"):
        self.d_in, self.n = d_in, 0
        zeros = lambda: torch.zeros(d_in, dtype=torch.float64, device=device)  # noqa: E731
        self.sum_x, self.sumsq_x, self.sum_r, self.sumsq_r = zeros(), zeros(), zeros(), zeros()
        self.l0_total = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, code: SparseCode | None = None) -> None:
        x64 = x.detach().to(self.sum_x.device, torch.float64)
        r64 = x64 - x_hat.detach().to(self.sum_x.device, torch.float64)
        self.n += x64.shape[0]
        self.sum_x += x64.sum(0)
        self.sumsq_x += (x64 * x64).sum(0)
        self.sum_r += r64.sum(0)
        self.sumsq_r += (r64 * r64).sum(0)
        if code is not None:
            self.l0_total += code.l0().sum()

    def state_dict(self) -> dict:
        return {"n": self.n, "tensors": [t.cpu() for t in (self.sum_x, self.sumsq_x, self.sum_r, self.sumsq_r, self.l0_total)]}

    def load_state_dict(self, state: dict) -> None:
        self.n = int(state["n"])
        for dst, src in zip((self.sum_x, self.sumsq_x, self.sum_r, self.sumsq_r, self.l0_total), state["tensors"]):
            dst.copy_(src)

    def _total_var(self, s: torch.Tensor, ss: torch.Tensor) -> float:
        mean = s / self.n
        return float((ss / self.n - mean * mean).clamp_min(0).sum())

    def evr(self) -> float:
        return 1.0 - self._total_var(self.sum_r, self.sumsq_r) / self._total_var(self.sum_x, self.sumsq_x)

    def mse(self) -> float:
        return float(self.sumsq_r.sum()) / (self.n * self.d_in)

    def l0(self) -> float:
        return float(self.l0_total) / self.n

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no samples accumulated")
        return {"evr": self.evr(), "mse": self.mse(), "l0": self.l0()}


class FiringTracker:
    """Samples since each latent last fired; a latent is dead after ``dead_after`` silent samples."""

    def __init__(self, d_sae: int, dead_after: int, device: str | torch.device = "cpu"):
        self.dead_after = dead_after
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, code: SparseCode) -> None:
        counts = torch.zeros_like(self.since_fired)
        counts.scatter_add_(0, code.indices.flatten(), (code.values > 0).flatten().long())
        self.since_fired += code.indices.shape[0]
        self.since_fired.masked_fill_(counts > 0, 0)

    def dead_mask(self) -> torch.Tensor:
        return self.since_fired >= self.dead_after

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    def state_dict(self) -> dict:
        return {"since_fired": self.since_fired.cpu(), "dead_after": self.dead_after}

    def load_state_dict(self, state: dict) -> None:
        self.since_fired.copy_(state["since_fired"])
        self.dead_after = int(state["dead_after"])
