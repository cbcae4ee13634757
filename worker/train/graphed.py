"""The training step replayed as one CUDA graph (setting ``cuda_graphs``).

At batch 64 a GPU finishes a step's ~70 operations sooner than Python can launch them one by one,
so the host, not the device, would set the pace of the seed run; a captured graph replays them all
with one launch. A replay runs the captured kernels on the captured memory and runs no Python, so:

* the batch is copied into a kept input tensor before each replay;
* what changes from step to step (learning rate, the recipe's step scalars) lives in device
  tensors written in place by :func:`~worker.train.loop.prepare_step`, outside the graph;
* the step's outputs are the same tensors at every replay: read them before the next step;
* capturing needs a few warm-up runs of the step, which would train: the trained state is copied
  before them and written back, in place, after the capture;
* a step the graph cannot replay runs eagerly: the very first (it creates Adam's state) and any
  batch of another size (an epoch's short last batch).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from clipscope.sae.metrics import FiringTracker
from clipscope.sae.model import TopKSAE
from worker.train.recipes import Recipe, StepOutput
from worker.train.step import compute_step, prepare_step

log = logging.getLogger(__name__)

WARMUP_RUNS = 3
"""Eager runs of the step on a side stream before capturing it, as PyTorch's CUDA-graph notes ask
(lazy initialisation in cuBLAS, cuSPARSE and autograd must not happen during a capture)."""


class CudaGraph:
    """Capture and replay through ``torch.cuda.CUDAGraph``."""

    def capture(self, fn: Callable[[], Any]) -> Any:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class GraphedStep:
    """``train_step(x, step, lr)`` for one SAE, recipe, optimiser and tracker, replayed as a graph.

    The optimiser must be Adam built with ``capturable=True``; its learning rate becomes a device
    tensor here. ``graph`` is the capture mechanism (tests pass a stand-in that runs on the CPU).
    """

    def __init__(self, sae: TopKSAE, recipe: Recipe, optimizer: torch.optim.Optimizer, tracker: FiringTracker,
                 batch_size: int, graph: CudaGraph | None = None):
        if not all(group.get("capturable") for group in optimizer.param_groups):
            raise ValueError("a CUDA graph replays Adam only when it is built with capturable=True")
        self.sae, self.recipe, self.optimizer, self.tracker = sae, recipe, optimizer, tracker
        self.batch_size = batch_size
        self.graph = graph or CudaGraph()
        self.captured = self.failed = False
        self.x: torch.Tensor | None = None
        self.out: StepOutput | None = None
        device = sae.encoder_weight.device
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)

    def __call__(self, x: torch.Tensor, step: int, lr: float) -> StepOutput:
        prepare_step(self.recipe, self.optimizer, step, lr, x.device)
        if x.shape[0] != self.batch_size or not self.optimizer.state or self.failed:
            return compute_step(self.sae, self.recipe, self.optimizer, self.tracker, x)
        if not self.captured and not self._capture(x):
            return compute_step(self.sae, self.recipe, self.optimizer, self.tracker, x)
        self.x.copy_(x)
        self.graph.replay()
        return self.out

    def _capture(self, x: torch.Tensor) -> bool:
        """Capture the step; on failure say why and train on eagerly (the state is put back either way)."""
        state = self._state()
        before = [t.clone() for t in state]
        self.x = x.clone()
        try:
            self.out = self.graph.capture(lambda: compute_step(self.sae, self.recipe, self.optimizer, self.tracker, self.x))
            self.captured = True
        except RuntimeError as exc:
            log.warning("CUDA graph capture of the training step failed (%s); training goes on without graphs", exc)
            self.failed = True
        finally:
            with torch.no_grad():
                for t, saved in zip(state, before):
                    t.copy_(saved)
        return self.captured

    def _state(self) -> list[torch.Tensor]:
        """Every tensor a step changes and a later step reads: weights, Adam's state, firing counts."""
        tensors = [p.data for p in self.sae.parameters()] + [self.tracker.since_fired]
        for per_param in self.optimizer.state.values():
            tensors += [v for v in per_param.values() if torch.is_tensor(v)]
        return tensors


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with a plain-number learning rate and ``capturable`` off, so a checkpoint
    resumes the same with or without CUDA graphs (the loop sets ``capturable`` again after loading)."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["lr"] = float(group["lr"])
        group["capturable"] = False
    return state
