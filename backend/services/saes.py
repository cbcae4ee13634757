"""SAEs for the overview: metadata, metrics, training curve, evaluation table and feature density."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from backend.services.feature_order import Ranking
from clipscope.db.models import Evaluation, Feature, Sae, SaeOverlap, SaeStatus, TrainingPoint
from clipscope.evaluation_summary import class_drops, loss_recovered
from clipscope.overlap_rows import best_of, chance_level, pair_versions


def sae_summary(sae: Sae) -> dict[str, Any]:
    return {
        "key": sae.key,
        "name": sae.name,
        "status": sae.status,
        "ready": sae.status == SaeStatus.READY,
        "model": sae.model,
        "pretrained": sae.pretrained,
        "random_weights": sae.random_weights,
        "layer": sae.layer,
        "tokens": sae.tokens,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "recipe": sae.recipe,
        "metrics": sae.metrics or {},
        "precompute": sae.precompute or {},
        "created_at": sae.created_at.isoformat() if sae.created_at else None,
    }


def feature_density(session: Session, sae: Sae, bins: int = 24) -> dict[str, Any] | None:
    """The SAE diagnostic of how often features fire: a histogram of the features' firing frequencies
    over the precompute images on log-spaced bins from one image to every image, with the dead (never
    fire) and dense (above the precompute's threshold) counts. None before the precompute."""
    n_images = (sae.precompute or {}).get("n_images")
    if sae.status != SaeStatus.READY or not n_images:
        return None
    freqs = np.fromiter(session.scalars(select(Feature.frequency).where(Feature.sae_id == sae.id)), dtype=np.float64)
    edges = np.geomspace(1 / n_images, 1.0, bins + 1)  # its ends exactly: a feature on one image, or on every one, is counted
    live = freqs[freqs > 0]
    threshold = ((sae.config or {}).get("precompute") or {}).get("dense_threshold")
    return {
        "n_images": n_images, "n_features": int(freqs.size), "edges": edges.tolist(), "counts": np.histogram(live, edges)[0].tolist(),
        "dead": int(freqs.size - live.size), "dense_threshold": threshold, "dense": int((freqs > threshold).sum()) if threshold else None,
        "median_live": float(np.median(live)) if live.size else None,
    }


def decoder_redundancy(session: Session, sae: Sae, bins: int = 20) -> dict[str, Any] | None:
    """How far each live feature's dictionary atom is from every other atom: a histogram of the cosine
    to its nearest other atom (the precompute's first neighbour) on ``bins`` bins from 0 to 1, with the
    count below 0, the median, the near-duplicates (above 0.9) and the level two random directions
    reach by chance among this many. Many atoms far above chance point at features split into
    near-copies. None before the precompute."""
    if sae.status != SaeStatus.READY:
        return None
    first = select(Feature.neighbours[0]).where(Feature.sae_id == sae.id, Feature.is_dead.is_(False))  # decoding whole lists: 5x the time
    nearest = np.array([found[1] for found in session.connection().execute(first).scalars() if found], dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {
        "n_features": int(nearest.size), "edges": edges.tolist(), "counts": np.histogram(nearest, edges)[0].tolist(),
        "below": int((nearest < 0).sum()), "median": float(np.median(nearest)) if nearest.size else None,
        "near_duplicates": int((nearest > 0.9).sum()), "chance": chance_level(sae.d_sae, sae.d_in),
    }


def shared_features(session: Session, sae: Sae) -> list[dict[str, Any]]:
    """Per other ready SAE at the same hook site, newest first: how many of this SAE's live features it has
    too (each one's best decoder cosine among its live atoms, ``SaeOverlap.summary``), as the precompute
    measured it for both SAEs' current precomputes; a pair not measured since either changed is left out."""
    if sae.status != SaeStatus.READY:
        return []
    rows = session.execute(
        select(SaeOverlap.versions, SaeOverlap.summary, Sae.key, Sae.name, Sae.recipe, Sae.tokens, Sae.d_sae, Sae.k, Sae.precompute)
        .join(Sae, Sae.id == SaeOverlap.other_id).where(SaeOverlap.sae_id == sae.id, Sae.status == SaeStatus.READY)
        .order_by(Sae.created_at.desc(), Sae.id.desc())
    ).all()
    return [{"sae": r.key, "name": r.name, "recipe": r.recipe, "tokens": r.tokens, "d_sae": r.d_sae, "k": r.k, **r.summary}
            for r in rows if r.versions == pair_versions(sae.precompute, r.precompute)]


_MATCHABLE = (select(Sae.key).join(SaeOverlap, SaeOverlap.other_id == Sae.id)
              .where(SaeOverlap.sae_id == bindparam("sae"), Sae.status == SaeStatus.READY).order_by(Sae.key))


def matchable(session: Session, sae: Sae) -> list[str]:
    """The keys of the other SAEs the list can rank ``sae``'s features against (``matched_in``): one small
    indexed query, built once, as the list page asks it on every request."""
    return list(session.connection().execute(_MATCHABLE, {"sae": sae.id}).scalars())


class NotShared(LookupError):
    """No other SAE of that key whose shared features with this one are measured; the sentence names those that are."""


def match_ranking(session: Session, sae: Sae, other: str, descending: bool) -> Ranking:
    """Each of ``sae``'s features ranked by its best decoder cosine among ``other``'s live atoms (as the
    precompute measured it for both current precomputes); dead features have none."""
    found = session.execute(
        select(SaeOverlap.best, SaeOverlap.versions, Sae.precompute).join(Sae, Sae.id == SaeOverlap.other_id)
        .where(SaeOverlap.sae_id == sae.id, Sae.key == other, Sae.status == SaeStatus.READY)
    ).first()
    if found is None or found.versions != pair_versions(sae.precompute, found.precompute):
        there = ", ".join(o["sae"] for o in shared_features(session, sae)) or "none yet (`clipscope run` measures them after each precompute)"
        raise NotShared(f"No SAE {other!r} at this SAE's hook site has its shared features measured with it; those that have: {there}.")
    return Ranking(best_of(found.best), "match_cosine", descending, version=(other, found.versions["other"]))


def list_saes(session: Session) -> list[Sae]:
    return list(session.scalars(select(Sae).order_by(Sae.created_at.desc(), Sae.id.desc())))


def training_curve(session: Session, sae_id: int) -> list[dict[str, Any]]:
    points = session.scalars(select(TrainingPoint).where(TrainingPoint.sae_id == sae_id).order_by(TrainingPoint.step))
    return [
        {
            "step": p.step, "samples": p.samples, "loss": p.loss, "mse": p.mse, "train_evr": p.train_evr,
            "heldout_evr": p.heldout_evr, "l0": p.l0, "dead_fraction": p.dead_fraction, "lr": p.lr,
        }
        for p in points
    ]


def evaluation_table(session: Session, sae_id: int) -> list[dict[str, Any]]:
    """One row per (dataset, templates): every condition's accuracy and losses (cross-entropy and KL from
    clean, in nats; None in an evaluation stored before they were kept), the spliced drop and the loss recovered."""
    rows = session.scalars(select(Evaluation).where(Evaluation.sae_id == sae_id).order_by(Evaluation.dataset, Evaluation.split))
    table: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        entry = table.setdefault(
            (r.dataset, r.split, r.dataset_key, r.templates),
            {"dataset": r.dataset, "split": r.split, "n": r.n, "templates": r.templates, "conditions": {}},
        )
        details = r.details or {}
        entry["conditions"][r.condition] = {"top1": r.top1, "top5": r.top5, "ce": details.get("ce"), "kl": details.get("kl")}
        if details.get("by_class"):
            entry.setdefault("_by_class", {})[r.condition] = details["by_class"]
    out = []
    for entry in table.values():
        c = entry["conditions"]
        if "clean" in c and "spliced" in c:
            clean, spliced = c["clean"]["top1"], c["spliced"]["top1"]
            entry["drop_pp"] = 100 * (clean - spliced)
            entry["drop_relative"] = (clean - spliced) / clean if clean else None
        entry["loss_recovered"] = loss_recovered(*((c.get(k) or {}).get("ce") for k in ("clean", "spliced", "mean_ablation")))
        entry["by_class"] = class_drops(entry.pop("_by_class", {}))
        out.append(entry)
    return out


def comparison_columns(saes: list[dict[str, Any]]) -> list[str]:
    """The evaluated image sets across ``saes`` (summaries with their ``evaluations``), first seen first:
    the overview's comparison gives each its own column of spliced drops."""
    return list(dict.fromkeys(f"{e['dataset']}/{e['split']}" for s in saes for e in s["evaluations"]))


def frontier(saes: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple]]]:
    """The overview's sparsity-fidelity charts over ``saes`` (summaries with their ``drops``, ``recovered`` and
    ``labels``): each SAE's held-out EVR, its zero-shot drop and loss recovered per evaluated set and the
    semantic share its labelled random sample estimates (with its interval), against its L0, as
    :func:`backend.charts.scatter` points leading to its card. An SAE without an L0 has no point, one
    without a labelled sample no semantic share, a set without a measure none of it."""
    evr: list[tuple] = []
    drops: dict[str, list[tuple]] = {}
    recovered: dict[str, list[tuple]] = {}
    semantic: list[tuple] = []
    for s in saes:
        l0 = s["metrics"].get("l0")
        if l0 is None:
            continue
        title, href = s["key"], f"#sae-{s['key']}"
        if s["metrics"].get("evr") is not None:
            evr.append((l0, s["metrics"]["evr"], title, href))
        for series, values in ((drops, s["drops"]), (recovered, s.get("recovered", {}))):
            for name, value in values.items():
                if value is not None:
                    series.setdefault(name, []).append((l0, value, title, href))
        sample = (s.get("labels") or {}).get("sample") or {}
        if sample.get("n"):
            share = next(r for r in sample["shares"] if r["category"] == "semantic")
            semantic.append((l0, share["share"], f"{title} (n = {sample['n']})", href, (share["low"], share["high"])))
    return {"evr": {"held-out EVR": evr}, "drops": drops, "recovered": recovered, "semantic": {"semantic share": semantic}}


def by_set(evaluations: list[dict[str, Any]], field: str) -> dict[str, float | None]:
    """Each evaluated image set's ``field`` of :func:`evaluation_table` (``drop_pp``: its top-1 drop with the
    SAE spliced in, in percentage points; ``loss_recovered``), None where it has none."""
    return {f"{e['dataset']}/{e['split']}": e.get(field) for e in evaluations}
