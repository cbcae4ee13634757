"""Which classes of the precompute set the SAE's live features lead: does it have a feature for every
dish of Food-101, and which classes does none lead? A feature's leading class is the class holding most
of the images it fires on (``Feature.top_class``).

A class's best feature is the one that alone picks it out best: the share of its images in the class
(how pure it is) times the share of the class's images it fires on (how much of the class it covers).
Purity alone would crown features that fire on a single image.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from clipscope.db.models import Feature, Sae


def class_coverage(session: Session, sae: Sae) -> dict[str, Any]:
    """``classes``: each class that leads a live feature, most features first, with how many it leads
    (``features``) and its ``best`` one (``index``, ``share`` of its images in the class, ``of_class``: share of
    the class's images it fires on; the lowest index among equals); ``without``: the precompute set's classes
    that lead none, in the set's order; ``n_classes``; ``live`` (live features)."""
    rows = session.connection().execute(select(Feature.idx, Feature.top_class, Feature.classes[0])  # the leading class comes first
                                        .where(Feature.sae_id == sae.id, Feature.is_dead.is_(False)).order_by(Feature.idx)).all()
    led: dict[str, dict[str, Any]] = {}
    for idx, name, lead in rows:
        if name is None:
            continue
        entry = led.setdefault(name, {"name": name, "features": 0, "best": None})
        entry["features"] += 1
        if lead is None or lead["name"] != name:
            continue
        best = entry["best"]
        if best is None or lead["share"] * lead["of_class"] > best["share"] * best["of_class"]:
            entry["best"] = {"index": idx, "share": lead["share"], "of_class": lead["of_class"]}
    names = list((sae.precompute or {}).get("classes") or [])
    return {"classes": sorted(led.values(), key=lambda e: (-e["features"], e["name"])), "without": [c for c in names if c not in led],
            "n_classes": len(names), "live": len(rows)}
