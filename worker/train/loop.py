"""Stage 2: train an SAE on cached activations, with a training curve, checkpoints and resume."""

from __future__ import annotations

import logging
import math
import shutil
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import delete, select
from tqdm import tqdm

from clipscope.activation_cache import ActivationCache
from clipscope.config import RunConfig, stable_hash
from clipscope.db.models import Sae, SaeStatus, TrainingPoint
from clipscope.db.session import session_scope
from clipscope.errors import ClipScopeError
from clipscope.sae.io import WEIGHTS_FILE, save_sae
from clipscope.sae.metrics import FiringTracker, ReconstructionStats
from clipscope.sae.model import TopKSAE
from worker.context import Context
from worker.train.checkpoint import CheckpointWriter, checkpoint_dirs, load_latest
from worker.train.data import EpochOrder, VectorSource, split_images
from worker.train.graphed import GraphedStep, portable_optimizer_state
from worker.train.recipes import make_recipe
from worker.train.step import adam, train_step

log = logging.getLogger(__name__)

# Fields that only change bookkeeping, not the trained weights: left out of the run's identity.
_BOOKKEEPING = {"log_every", "checkpoint_every", "keep_checkpoints", "resident", "eval_every"}


@dataclass
class TrainResult:
    sae_key: str
    sae_dir: Path
    metrics: dict[str, float]
    trained_steps: int  # steps run by this call (0 when the finished SAE was reused)
    imported: bool = False  # this call imported it (``sae.import_from``)


def run_identity(cfg: RunConfig, train_cache: ActivationCache, eval_cache: ActivationCache | None) -> dict[str, Any]:
    train_cfg = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _BOOKKEEPING}
    return {
        "train_cache": train_cache.path.name,
        "eval_cache": eval_cache.path.name if eval_cache else None,
        "sae": cfg.sae.model_dump(mode="json"),
        "use_b_dec": cfg.use_b_dec,
        "train": train_cfg,
    }


def sae_key(cfg: RunConfig, train_cache: ActivationCache, eval_cache: ActivationCache | None) -> str:
    return f"{cfg.name}-{stable_hash(run_identity(cfg, train_cache, eval_cache), 10)}"


class _Window:
    """Sums over the steps since the last training-curve point, kept on the device."""

    def __init__(self, d_in: int, device: str):
        self.stats = ReconstructionStats(d_in, device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.mse = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0
        self.extra: dict[str, torch.Tensor] = {}

    def add(self, out) -> None:
        self.loss += out.loss.detach()
        self.mse += out.mse.detach()
        self.steps += 1
        for name, value in out.extra.items():
            self.extra[name] = self.extra.get(name, 0) + value.detach().double().to(self.loss.device)

    def state_dict(self) -> dict:
        return {
            "stats": self.stats.state_dict(),
            "loss": self.loss.cpu(),
            "mse": self.mse.cpu(),
            "steps": self.steps,
            "extra": {k: v.cpu() for k, v in self.extra.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state["stats"])
        self.loss.copy_(state["loss"])
        self.mse.copy_(state["mse"])
        self.steps = state["steps"]
        self.extra = {k: v.to(self.loss.device) for k, v in state["extra"].items()}


@torch.no_grad()
def heldout_metrics(sae: TopKSAE, heldout: torch.Tensor, batch_size: int = 1024) -> dict[str, float]:
    stats = ReconstructionStats(sae.d_in, heldout.device)
    for start in range(0, len(heldout), batch_size):
        x = heldout[start : start + batch_size]
        x_hat, code = sae(x)
        stats.update(x, x_hat, code)
    return stats.result()


def sae_meta(cfg: RunConfig, ctx_meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": cfg.model.name,
        "pretrained": cfg.model.pretrained,
        "random_weights": cfg.model.is_random,
        "layer": cfg.model.layer,
        "tokens": cfg.model.tokens,
        "normalization": "none",
        "recipe": cfg.train.recipe,
        "config": cfg.model_dump(mode="json"),
        **ctx_meta,
    }


def train(
    ctx: Context, cfg: RunConfig, train_cache: ActivationCache, eval_cache: ActivationCache | None = None, stop_after: int | None = None
) -> TrainResult:
    """Train (or resume, or reuse) the SAE of ``cfg``.

    ``stop_after`` stops after that many total steps without a final checkpoint, exactly as a
    killed run would (tests use it); the next call resumes from the last periodic checkpoint.
    """
    key = sae_key(cfg, train_cache, eval_cache)
    run_dir = ctx.layout.saes / key
    sae_dir = run_dir / "sae"
    url = ctx.database_url
    provenance = cache_provenance(train_cache, eval_cache)
    meta = sae_meta(cfg, {"key": key, "provenance": provenance})
    with session_scope(url) as s:
        row = s.scalar(select(Sae).where(Sae.key == key))
        if is_finished(row, sae_dir):
            log.info("SAE %s is already trained: reused", key)
            return TrainResult(key, sae_dir, row.metrics or {}, 0)
        row = describe_row(s, row, key, cfg, SaeStatus.TRAINING, cfg.train.recipe, (train_cache.d, cfg.sae.d_sae, cfg.sae.k), provenance)
        sae_id = row.id

    device, tc = ctx.device, cfg.train
    if eval_cache is not None:
        train_rows, held_rows = np.arange(train_cache.n_images), None
    else:
        train_rows, held_rows = split_images(train_cache.n_images, tc.holdout_fraction, tc.seed)
    source = VectorSource(train_cache, train_rows, device, resident=tc.resident)
    order = EpochOrder(len(source), tc.batch_size, tc.epochs, tc.seed, device)
    heldout = heldout_vectors(eval_cache, held_rows, train_cache, tc, device)
    recipe = make_recipe(tc, order.total_steps, train_cache.d, cfg.sae.d_sae)
    dead_after = tc.dead_after or max(tc.batch_size, min(10_000_000, order.total_steps * tc.batch_size // 10))

    sae = TopKSAE(train_cache.d, cfg.sae.d_sae, cfg.sae.k, use_b_dec=cfg.use_b_dec).to(device)
    tracker = FiringTracker(cfg.sae.d_sae, dead_after, device)
    window = _Window(train_cache.d, device)
    resumed = load_latest(run_dir, device)
    if resumed is not None:
        loaded, state = resumed
        sae.load_state_dict(loaded.state_dict())
        step = int(state["step"])
        tracker.load_state_dict(state["tracker"])
        window.load_state_dict(state["window"])
        log.info("resuming %s from step %d", key, step)
    else:
        recipe.initialise(sae, source.sample(32_768, tc.seed))
        step = 0
    recipe.prepare(sae)
    graphs = _use_graphs(ctx.settings.cuda_graphs, device)
    optimizer = adam(recipe.parameters(sae), recipe.lr_at(step), capturable=graphs)
    if resumed is not None:
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # checkpoints are saved portable (capturable off)
            group["capturable"] = graphs
    step_fn = GraphedStep(sae, recipe, optimizer, tracker, tc.batch_size) if graphs else None
    with session_scope(url) as s:  # points logged after the checkpoint will be logged again
        s.execute(delete(TrainingPoint).where(TrainingPoint.sae_id == sae_id, TrainingPoint.step > step))

    end = order.total_steps if stop_after is None else min(order.total_steps, stop_after)
    started, start_step = time.perf_counter(), step
    bar = tqdm(total=order.total_steps, initial=step, unit="step", desc=f"train {cfg.train.recipe}", disable=not ctx.settings.progress)
    writer = CheckpointWriter(run_dir, meta, tc.keep_checkpoints)
    checkpoint_s = 0.0
    with bar, closing(writer):  # a stop, or an error, waits for the checkpoint being written
        while step < end:
            x = source.gather(order.rows(step))
            lr = recipe.lr_at(step)
            out = step_fn(x, step, lr) if step_fn else train_step(sae, recipe, optimizer, tracker, x, step, lr)
            with torch.no_grad():
                window.stats.update(x, out.x_hat, out.code)
                window.add(out)
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == order.total_steps:
                evaluate_now = step % tc.eval_every == 0 or step == order.total_steps
                _stop_if_diverged(window, step)
                _log_point(url, sae_id, step, tc.batch_size, window, tracker, lr, sae, heldout if evaluate_now else None, bar)
                window = _Window(train_cache.d, device)
            if step % tc.checkpoint_every == 0 and step < order.total_steps:
                _stop_if_diverged(window, step)  # the steps since the last point; the checkpoint reads the device anyway
                saving = time.perf_counter()  # the snapshot, plus any wait for the previous write to finish
                writer.save(step, sae, {"optimizer": portable_optimizer_state(optimizer), "tracker": tracker.state_dict(), "window": window.state_dict()})
                checkpoint_s += time.perf_counter() - saving
    elapsed = time.perf_counter() - started
    if step < order.total_steps:  # stopped on request, as if killed: the next call resumes from the last checkpoint
        return TrainResult(key, sae_dir, {}, step - start_step)

    metrics = {**heldout_metrics(sae, heldout), "dead_fraction": tracker.dead_fraction(), "dead_after": dead_after,
               "steps": step, "train_seconds": elapsed, "checkpoint_seconds": checkpoint_s}
    save_sae(sae, sae_dir, {**meta, "metrics": metrics})
    with session_scope(url) as s:
        row = s.get(Sae, sae_id)
        row.status, row.metrics = SaeStatus.TRAINED, metrics
    for _, old in checkpoint_dirs(run_dir):
        shutil.rmtree(old, ignore_errors=True)
    log.info(
        "trained %s: held-out EVR %.4f, L0 %.1f, MSE %.5g, dead %.2f%% (%d steps in %.1f s)",
        key, metrics["evr"], metrics["l0"], metrics["mse"], 100 * metrics["dead_fraction"], step - start_step, elapsed,
    )
    return TrainResult(key, sae_dir, metrics, step - start_step)


def cache_provenance(train_cache: ActivationCache, eval_cache: ActivationCache | None) -> dict[str, Any]:
    """Where an SAE's training (or held-out) vectors came from: CLIP's weights, the caches, the dataset."""
    return {
        "weights": train_cache.meta["key"]["weights"],
        "train_cache": train_cache.path.name,
        "eval_cache": eval_cache.path.name if eval_cache else None,
        "dataset": train_cache.meta["key"]["dataset"],
    }


def is_finished(row: Sae | None, sae_dir: Path) -> bool:
    """The SAE of ``row`` is trained (or imported), and its weights are on disk: a run reuses it."""
    return row is not None and row.status in (SaeStatus.TRAINED, SaeStatus.READY) and (sae_dir / WEIGHTS_FILE).exists()


def describe_row(
    session, row: Sae | None, key: str, cfg: RunConfig, status: str, recipe: str, shape: tuple[int, int, int], provenance: dict[str, Any]
) -> Sae:
    """The SAE's database row (created when ``row`` is None) with what the run knows of it: model, site,
    ``shape`` (d_in, d_sae, k), recipe, config and provenance."""
    if row is None:
        row = Sae(key=key, name=cfg.name)
        session.add(row)
    row.status = status
    row.model, row.pretrained, row.random_weights = cfg.model.name, weights_label(cfg), cfg.model.is_random
    row.layer, row.tokens, row.recipe = cfg.model.layer, cfg.model.tokens, recipe
    row.d_in, row.d_sae, row.k = shape
    row.config, row.provenance = cfg.model_dump(mode="json"), provenance
    session.flush()
    return row


def weights_label(cfg: RunConfig) -> str:
    if cfg.model.weights_file is not None:
        return "file"
    return "none" if cfg.model.is_random else cfg.model.pretrained


def _use_graphs(setting: str, device: str) -> bool:
    """Whether steps replay as a CUDA graph: asked for, and on a GPU."""
    return setting == "yes" and torch.device(device).type == "cuda"


def heldout_vectors(eval_cache, held_rows, train_cache, tc, device) -> torch.Tensor:
    if eval_cache is not None:
        src = VectorSource(eval_cache, np.arange(eval_cache.n_images), device, resident=False)
    elif held_rows is not None and len(held_rows):
        src = VectorSource(train_cache, held_rows, device, resident=False)
    else:
        raise ValueError("no held-out data: set train.holdout_fraction > 0 or train.eval_data")
    return src.sample(tc.eval_max_samples, tc.seed + 1)


def _stop_if_diverged(window: _Window, step: int) -> None:
    """A mean loss over ``window`` (the steps up to ``step``) that is not finite ends the run before it is
    logged or checkpointed: every later step would train on NaN (and SQLite stores no NaN)."""
    loss = float(window.loss) / window.steps if window.steps else 0.0
    if not math.isfinite(loss):
        raise ClipScopeError(
            f"Training diverged: the mean loss of steps {step - window.steps + 1}..{step} is {loss}. No checkpoint holds "
            "those steps; lower train.lr, or look for non-finite values in the activation cache, then run again."
        )


def _log_point(url, sae_id, step, batch_size, window: _Window, tracker, lr, sae, heldout, bar) -> None:
    n = window.steps
    point = TrainingPoint(
        sae_id=sae_id,
        step=step,
        samples=step * batch_size,
        loss=float(window.loss) / n,
        mse=float(window.mse) / n,
        train_evr=window.stats.evr(),
        l0=window.stats.l0(),
        dead_fraction=tracker.dead_fraction(),
        lr=lr,
        heldout_evr=heldout_metrics(sae, heldout)["evr"] if heldout is not None else None,
        extra={k: float(v) / n for k, v in window.extra.items()},
    )
    with session_scope(url) as s:
        s.add(point)
    held = f" heldout_evr {point.heldout_evr:.4f}" if point.heldout_evr is not None else ""
    bar.write(
        f"step {step:>7} loss {point.loss:.5f} mse {point.mse:.5g} evr {point.train_evr:.4f}{held} "
        f"l0 {point.l0:.1f} dead {100 * point.dead_fraction:.2f}% lr {lr:.2e}"
    )
