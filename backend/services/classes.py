"""Which classes of the precompute set the SAE's live features lead: does it have a feature for every
dish of Food-101, and which classes does none lead? A feature's leading class is the class holding most
of the images it fires on (``Feature.top_class``), and its share of them how class-pure it is."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from clipscope.db.models import Feature, Sae


def class_coverage(session: Session, sae: Sae) -> dict[str, Any]:
    """``classes``: each class that leads a live feature, most features first, with how many it leads and its
    purest feature (``purest``, the largest leading-class share ``best_share``; the lowest index among equals); ``without``: the precompute
    set's classes that lead none, in the set's order; ``n_classes`` and ``live`` (live features)."""
    rows = session.execute(select(Feature.idx, Feature.top_class, Feature.top_class_share)
                           .where(Feature.sae_id == sae.id, Feature.is_dead.is_(False)).order_by(Feature.idx)).all()
    led: dict[str, dict[str, Any]] = {}
    for idx, name, share in rows:
        if name is None:
            continue
        entry = led.setdefault(name, {"name": name, "features": 0, "best_share": -1.0, "purest": None})
        entry["features"] += 1
        if share is not None and share > entry["best_share"]:
            entry["best_share"], entry["purest"] = share, idx
    for entry in led.values():
        if entry["purest"] is None:
            entry["best_share"] = None
    classes = list((sae.precompute or {}).get("classes") or [])
    return {"classes": sorted(led.values(), key=lambda e: (-e["features"], e["name"])), "without": [c for c in classes if c not in led],
            "n_classes": len(classes), "live": len(rows)}
