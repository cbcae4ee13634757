"""Which classes' recognition a feature carries: the evaluation's per-class lists of most supporting
features (``clipscope.attribution.ClassSupport``), turned around per feature for its page.

The lists sit in the SAE's clean evaluation rows; an evaluation that writes them also moves the
SAE row's ``updated_at``, so the turned-around index is built once per SAE version and kept.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.services.recently_used import RecentlyUsed
from clipscope.db.models import Evaluation, Sae


class ClassesSupported:
    def __init__(self, max_saes: int = 8):
        self._index: RecentlyUsed[dict[int, list[dict[str, Any]]]] = RecentlyUsed(max_saes)

    def of(self, session: Session, sae: Sae, feature: int) -> list[dict[str, Any]]:
        """The classes whose recognition lists ``feature`` among its most supporting features, highest support first."""
        return self._index.get((sae.id, sae.updated_at), lambda: _index(session, sae.id)).get(feature, [])


def _index(session: Session, sae_id: int) -> dict[int, list[dict[str, Any]]]:
    rows = session.execute(select(Evaluation.dataset, Evaluation.split, Evaluation.details).where(
        Evaluation.sae_id == sae_id, Evaluation.condition == "clean"))
    out: dict[int, list[dict[str, Any]]] = {}
    for dataset, split, details in rows:
        by_class = (details or {}).get("by_class") or {}
        for name, features in zip(by_class.get("classes", []), by_class.get("features") or []):
            for rank, (f, support) in enumerate(features, 1):
                out.setdefault(f, []).append({"set": f"{dataset}/{split}", "class": name, "rank": rank, "support": support})
    for entries in out.values():
        entries.sort(key=lambda e: (-e["support"], e["set"], e["class"]))
    return out
