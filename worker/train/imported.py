"""The train stage for an SAE trained elsewhere (``sae.import_from``): read it, check it reads this
run's hook site, measure it on the held-out vectors as a trained SAE is measured, and store it as
ClipScope's own SAE folder and row, so evaluation, precompute and the explorer treat it alike."""

from __future__ import annotations

import logging

from sqlalchemy import select

from clipscope.activation_cache import ActivationCache
from clipscope.config import RunConfig, stable_hash
from clipscope.db.models import Sae, SaeStatus
from clipscope.db.session import session_scope
from clipscope.errors import ClipScopeError
from clipscope.sae.external import file_sha256, inspect_external_sae, load_external_sae
from clipscope.sae.io import save_sae
from worker.context import Context
from worker.train.data import split_images
from worker.train.loop import TrainResult, cache_provenance, describe_row, heldout_metrics, heldout_vectors, is_finished, sae_meta

log = logging.getLogger("clipscope")


def import_sae(ctx: Context, cfg: RunConfig, train_cache: ActivationCache, eval_cache: ActivationCache | None = None) -> TrainResult:
    """Import (or reuse an import of) the SAE in ``cfg.sae.import_from`` (whose kind, width and block the
    config's validation checked)."""
    found = inspect_external_sae(cfg.sae.import_from)
    digest, source = file_sha256(found.weights), str(found.folder.resolve())
    tc = cfg.train
    identity = {
        "import": digest, "format": found.format, "train_cache": train_cache.path.name,
        "eval_cache": eval_cache.path.name if eval_cache else None,
        "heldout": {"fraction": tc.holdout_fraction, "seed": tc.seed, "max_samples": tc.eval_max_samples},
    }
    key = f"{cfg.name}-{stable_hash(identity, 10)}"
    sae_dir = ctx.layout.saes / key / "sae"
    with session_scope(ctx.database_url) as s:
        row = s.scalar(select(Sae).where(Sae.key == key))
        if is_finished(row, sae_dir):
            log.info("SAE %s is already imported: reused", key)
            return TrainResult(key, sae_dir, row.metrics or {}, 0)
    if found.d_in != train_cache.d:
        raise ClipScopeError(f"{source} reads {found.d_in}-dimensional inputs; the residual stream of {cfg.model.name} has {train_cache.d}.")
    held_rows = None if eval_cache is not None else split_images(train_cache.n_images, tc.holdout_fraction, tc.seed)[1]
    device = ctx.device
    sae = load_external_sae(found).to(device)
    metrics = heldout_metrics(sae, heldout_vectors(eval_cache, held_rows, train_cache, tc, device))
    provenance = {"imported_from": source, "format": found.format, "sha256": digest, **cache_provenance(train_cache, eval_cache)}
    save_sae(sae, sae_dir, {**sae_meta(cfg, {"key": key, "provenance": provenance}), "recipe": "imported", "metrics": metrics})
    with session_scope(ctx.database_url) as s:
        row = s.scalar(select(Sae).where(Sae.key == key))
        row = describe_row(s, row, key, cfg, SaeStatus.TRAINED, "imported", (sae.d_in, sae.d_sae, sae.k), provenance)
        row.metrics = metrics
    log.info("imported %s from %s (%s, %d latents, k = %d): held-out EVR %.4f, L0 %.1f, MSE %.5g",
             key, source, found.format, sae.d_sae, sae.k, metrics["evr"], metrics["l0"], metrics["mse"])
    return TrainResult(key, sae_dir, metrics, 0, imported=True)
