"""The two training recipes: what is optimised, the loss, and what happens around each step.

* ``seed`` - the study to the letter: Adam on the encoder weight and ``b_enc`` only; the decoder is never
  optimised and changes only through the unit-norm renormalisation after every step; loss =
  MSE + l1(step) * L1, with l1 warmed linearly from ``l1_start`` to ``l1_end`` over
  ``l1_warmup_steps``; constant learning rate.
* ``topk`` - current practice (Gao et al. 2024; EleutherAI sparsify): ``b_dec`` from the data mean
  or geometric median, decoder initialised as the encoder's transpose and trained, the gradient
  component parallel to each atom removed before the step, loss = normalised MSE + AuxK on dead
  latents, LR warm-up then linear decay.

Loss terms: ``MSE = mean((x - x_hat)^2)``; ``L1 = mean over the batch of sum_j |z_j|``;
``FVU = sum (x - x_hat)^2 / sum (x - mean_batch(x))^2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clipscope.config import TrainConfig
from clipscope.sae.metrics import FiringTracker
from clipscope.sae.model import SparseCode, TopKSAE


@dataclass
class StepOutput:
    loss: torch.Tensor
    mse: torch.Tensor
    x_hat: torch.Tensor
    code: SparseCode
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class Recipe:
    name: str

    def __init__(self, cfg: TrainConfig, total_steps: int, d_in: int, d_sae: int):
        self.cfg, self.total_steps, self.d_in, self.d_sae = cfg, total_steps, d_in, d_sae
        self.scalars: dict[str, torch.Tensor] = {}

    def initialise(self, sae: TopKSAE, sample: torch.Tensor) -> None:
        """Set the starting weights (a fresh run only; a resumed run loads them)."""
        raise NotImplementedError

    def prepare(self, sae: TopKSAE) -> None:
        """Mark which parameters train (fresh and resumed runs alike)."""

    def parameters(self, sae: TopKSAE) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    @property
    def base_lr(self) -> float:
        raise NotImplementedError

    def lr_at(self, step: int) -> float:
        return self.base_lr

    def step_scalars(self, step: int) -> dict[str, float]:
        """The loss's numbers that change with the step (the seed recipe's L1 coefficient)."""
        return {}

    def set_step(self, step: int, device: torch.device) -> None:
        """Write ``step_scalars(step)`` into ``self.scalars``, tensors kept on the device and filled in place,
        which ``step_loss`` reads: a captured CUDA graph replays the loss as it was, and reads them anew."""
        for name, value in self.step_scalars(step).items():
            if name not in self.scalars or self.scalars[name].device.type != torch.device(device).type:
                self.scalars[name] = torch.empty((), device=device)  # then kept: a graph reads this very tensor
            self.scalars[name].fill_(value)

    def loss(self, sae: TopKSAE, x: torch.Tensor, step: int, tracker: FiringTracker) -> StepOutput:
        """The loss of step ``step`` on batch ``x``."""
        self.set_step(step, x.device)
        return self.step_loss(sae, x, tracker)

    def step_loss(self, sae: TopKSAE, x: torch.Tensor, tracker: FiringTracker) -> StepOutput:
        """The loss at the step last given to ``set_step``."""
        raise NotImplementedError

    def before_step(self, sae: TopKSAE) -> None:
        """Between backward and the optimiser step."""

    def after_step(self, sae: TopKSAE) -> None:
        """After the optimiser step: both recipes keep every atom unit-norm."""
        sae.normalize_decoder_()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class SeedRecipe(Recipe):
    name = "seed"

    def initialise(self, sae: TopKSAE, sample: torch.Tensor) -> None:
        _init_on_cpu(sae, "linear", self.cfg.seed)

    def prepare(self, sae: TopKSAE) -> None:
        sae.W_dec.requires_grad_(False)

    def after_step(self, sae: TopKSAE) -> None:
        """The study renormalises the decoder after every step. Its decoder is never optimised and
        was normalised at initialisation, so that renormalisation is the identity (to rounding):
        it is not recomputed 17,760 times. A test checks the decoder stays unit-norm and unchanged."""

    def parameters(self, sae: TopKSAE) -> list[torch.nn.Parameter]:
        return [sae.encoder_weight, sae.b_enc]

    @property
    def base_lr(self) -> float:
        return self.cfg.lr or 1e-3

    def l1_coefficient(self, step: int) -> float:
        c = self.cfg
        if c.l1_warmup_steps == 0 or step >= c.l1_warmup_steps:
            return c.l1_end
        return c.l1_start + (c.l1_end - c.l1_start) * step / c.l1_warmup_steps

    def step_scalars(self, step: int) -> dict[str, float]:
        return {"l1_coef": self.l1_coefficient(step)}

    def step_loss(self, sae: TopKSAE, x: torch.Tensor, tracker: FiringTracker) -> StepOutput:
        code = sae.encode(x)
        x_hat = sae.decode(code)
        mse = F.mse_loss(x_hat, x)
        l1 = code.values.abs().sum(-1).mean()
        coef = self.scalars["l1_coef"]  # on the device: a host number copied there would wait for a GPU every step
        return StepOutput(mse + coef * l1, mse, x_hat, code, {"l1": l1.detach(), "l1_coef": coef.clone()})


class TopKRecipe(Recipe):
    name = "topk"

    def initialise(self, sae: TopKSAE, sample: torch.Tensor) -> None:
        _init_on_cpu(sae, "tied", self.cfg.seed)
        with torch.no_grad():
            if sae.use_b_dec and self.cfg.b_dec_init == "mean":
                sae.b_dec.copy_(sample.mean(0))
            elif sae.use_b_dec and self.cfg.b_dec_init == "median":
                sae.b_dec.copy_(geometric_median(sample))

    def parameters(self, sae: TopKSAE) -> list[torch.nn.Parameter]:
        return [p for p in (sae.encoder_weight, sae.b_enc, sae.W_dec, sae.b_dec) if p.requires_grad]

    @property
    def base_lr(self) -> float:
        return self.cfg.lr or 2e-4 / math.sqrt(self.d_sae / 2**14)

    def before_step(self, sae: TopKSAE) -> None:
        """Remove each atom's gradient component along itself, so the step cannot change its norm to first order."""
        sae.remove_parallel_decoder_grad_()

    @property
    def warmup_steps(self) -> int:
        if self.cfg.lr_warmup_steps is not None:
            return self.cfg.lr_warmup_steps
        return min(1000, self.total_steps // 20)

    def lr_at(self, step: int) -> float:
        lr = self.base_lr
        if step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        decay_steps = int(self.total_steps * self.cfg.lr_decay_fraction)
        decay_start = self.total_steps - decay_steps
        if decay_steps > 0 and step >= decay_start:
            lr *= (self.total_steps - step) / decay_steps
        return lr

    def step_loss(self, sae: TopKSAE, x: torch.Tensor, tracker: FiringTracker) -> StepOutput:
        """FVU + AuxK: the residual reconstructed from the top ``k_aux`` dead latents (Gao et al. 2024).

        AuxK is computed every step with a mask instead of a data-dependent branch, so it never
        stalls the device; with no dead latent all aux values are zero and so is its loss.
        """
        dead = tracker.dead_mask()
        k_aux = min(self.cfg.auxk_k or self.d_in // 2, self.d_sae)
        code, aux = sae.encode_with_aux(x, dead, k_aux)
        decoded, err_hat = sae.decode_codes(code, aux)
        x_hat = decoded + sae.b_dec
        err = x - x_hat
        fvu = err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        mse = err.pow(2).mean()
        residual = err.detach()
        auxk = (err_hat - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12) * dead.any()
        return StepOutput(fvu + self.cfg.auxk_coef * auxk, mse, x_hat, code, {"fvu": fvu.detach(), "auxk": auxk.detach()})


def _init_on_cpu(sae: TopKSAE, scheme: str, seed: int) -> None:
    """Initialise with a CPU generator, so the same seed gives the same weights on any device."""
    device = sae.encoder_weight.device
    sae.to("cpu").init_weights(scheme, generator=_generator(seed))
    sae.to(device)


@torch.no_grad()
def geometric_median(points: torch.Tensor, iters: int = 100, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iters):
        dist = (points - median).norm(dim=1).clamp_min(eps)
        weights = 1 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < eps * median.norm().clamp_min(1.0):
            median = new
            break
        median = new
    return median.float()


RECIPES: dict[str, type[Recipe]] = {"seed": SeedRecipe, "topk": TopKRecipe}


def make_recipe(cfg: TrainConfig, total_steps: int, d_in: int, d_sae: int) -> Recipe:
    return RECIPES[cfg.recipe](cfg, total_steps, d_in, d_sae)
