"""One optimisation step: what changes from step to step, then the step's own work."""

from __future__ import annotations

import torch

from clipscope.sae.metrics import FiringTracker
from clipscope.sae.model import TopKSAE
from worker.train.recipes import Recipe, StepOutput


def train_step(sae: TopKSAE, recipe: Recipe, optimizer: torch.optim.Optimizer, tracker: FiringTracker, x: torch.Tensor, step: int, lr: float) -> StepOutput:
    """One optimisation step, with no host synchronisation (the benchmark times exactly this)."""
    prepare_step(recipe, optimizer, step, lr, x.device)
    return compute_step(sae, recipe, optimizer, tracker, x)


def prepare_step(recipe: Recipe, optimizer: torch.optim.Optimizer, step: int, lr: float, device: torch.device) -> None:
    """What changes from one step to the next: the learning rate and the recipe's step scalars, written in
    place when they are tensors (a captured CUDA graph of ``compute_step`` reads them anew each replay)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    recipe.set_step(step, device)


def compute_step(sae: TopKSAE, recipe: Recipe, optimizer: torch.optim.Optimizer, tracker: FiringTracker, x: torch.Tensor) -> StepOutput:
    """Loss, backward, optimiser step and firing counts at the step ``prepare_step`` set."""
    out = recipe.step_loss(sae, x, tracker)
    sae.zero_grad_()
    out.loss.backward()
    recipe.before_step(sae)
    optimizer.step()
    recipe.after_step(sae)
    with torch.no_grad():
        tracker.update(out.code)
    return out


def adam(params, lr: float, capturable: bool = False) -> torch.optim.Adam:
    """Fused Adam (one kernel over all parameters; CPU and CUDA in torch >= 2.4), else the default.
    ``capturable`` keeps its step counts on the device, as a CUDA graph of the step needs."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, capturable=capturable)
