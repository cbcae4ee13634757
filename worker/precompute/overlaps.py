"""After a precompute: how many of the SAE's live features each other ready SAE at the same hook site has
too, and the reverse (:func:`clipscope.matching.best_cosines`, one product per pair), into ``sae_overlaps``.

A pair is measured again only when either side's precompute changed (its key), so a ``clipscope run``
that reuses everything measures only the pairs it lacks: those with SAEs precomputed since, or before
overlaps were kept.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sqlalchemy import delete, select

from clipscope.db.models import Feature, Sae, SaeOverlap, SaeStatus
from clipscope.db.session import session_scope
from clipscope.errors import ClipScopeError
from clipscope.matching import best_cosines, overlap_summary, unit_atoms
from clipscope.overlap_rows import best_bytes, chance_level, pair_versions
from clipscope.sae.io import load_sae
from worker.context import Context

log = logging.getLogger(__name__)


def same_site(a: Sae, b: Sae) -> bool:
    """Two SAEs whose atoms live in one space: the same CLIP model and weights, the same block, the same width."""
    return (a.model, a.pretrained, a.layer, a.d_in) == (b.model, b.pretrained, b.layer, b.d_in)


def _live_atoms(ctx: Context, sae_id: int, key: str) -> tuple[torch.Tensor, np.ndarray]:
    """Unit atoms of the features that fire on the SAE's precompute set (on the context's device), and those features."""
    with session_scope(ctx.database_url) as s:
        live = np.array(s.scalars(select(Feature.idx).where(Feature.sae_id == sae_id, Feature.n_active > 0).order_by(Feature.idx)).all(), dtype=np.int64)
    atoms = load_sae(ctx.layout.saes / key / "sae", ctx.device)[0].W_dec
    return unit_atoms(atoms[torch.from_numpy(live).to(atoms.device)]), live


def update_overlaps(ctx: Context, sae_key: str) -> list[str]:
    """Measure the pairs of ``sae_key`` with every other ready SAE at its site that are missing or out of
    date; each pair (both directions) is one transaction. Returns the other SAEs' keys it measured; an SAE
    whose weights are not here is skipped with a log line."""
    with session_scope(ctx.database_url) as s:
        me = s.scalar(select(Sae).where(Sae.key == sae_key))
        if me is None or me.status != SaeStatus.READY:
            return []
        others = [o for o in s.scalars(select(Sae).where(Sae.status == SaeStatus.READY, Sae.id != me.id).order_by(Sae.id)) if same_site(me, o)]
        kept = {o.other_id: o.versions for o in s.scalars(select(SaeOverlap).where(SaeOverlap.sae_id == me.id))}
        pairs = [(o.id, o.key, o.d_in, o.d_sae, pair_versions(me.precompute, o.precompute)) for o in others]
        todo = [pair for pair in pairs if kept.get(pair[0]) != pair[-1]]
        my_id, my_d_in, my_d_sae = me.id, me.d_in, me.d_sae
    if not todo:
        return []
    atoms, live = _live_atoms(ctx, my_id, sae_key)
    measured = []
    for other_id, other_key, other_d_in, other_d_sae, versions in todo:
        try:
            theirs, their_live = _live_atoms(ctx, other_id, other_key)
        except ClipScopeError as exc:
            log.info("overlap with %s skipped: %s", other_key, exc)
            continue
        best_mine, best_theirs = best_cosines(atoms, theirs)
        rows = [
            (my_id, other_id, versions, overlap_summary(best_mine, chance_level(len(theirs), other_d_in)),
             best_bytes(best_mine, live, my_d_sae)),
            (other_id, my_id, {"sae": versions["other"], "other": versions["sae"]}, overlap_summary(best_theirs, chance_level(len(atoms), my_d_in)),
             best_bytes(best_theirs, their_live, other_d_sae)),
        ]
        with session_scope(ctx.database_url) as w:
            for sae_id, against, pair, summary, best in rows:
                w.execute(delete(SaeOverlap).where(SaeOverlap.sae_id == sae_id, SaeOverlap.other_id == against))
                w.add(SaeOverlap(sae_id=sae_id, other_id=against, versions=pair, summary=summary, best=best))
        measured.append(other_key)
    return measured
