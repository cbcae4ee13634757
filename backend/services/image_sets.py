"""Which features a set of uploaded images shares, ranked by :func:`clipscope.image_sets.rank_set`, with what
the page shows of each: its label, automatic name and top images."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from backend.services.firing import Firing
from backend.services.features import label_dict, labels_of, maxima_of, top_examples
from clipscope.db.models import Sae
from clipscope.image_sets import rank_set


def features_of_set(session: Session, sae: Sae, firings: list[Firing], without: list[Firing] = (), limit: int = 30,
                    strip: int = 6) -> dict[str, Any]:
    """The ``limit`` features ranked first among those firing on any of ``firings`` (against the counter-examples
    ``without``, if any), each a :func:`~clipscope.image_sets.rank_set` row with its label, automatic name and
    ``strip`` top images; and how many features fire on any and on all of the images."""
    stats = maxima_of(session, sae.id, sorted({f for firing in firings for f in firing.activations}))
    rows = rank_set([f.activations for f in firings], [f.activations for f in without],
                    {f: (s.max_activation, s.frequency) for f, s in stats.items()})
    shown = rows[:limit]
    ids = [r["index"] for r in shown]
    labels, strips = labels_of(session, sae.id, ids), top_examples(session, sae.id, ids, limit=strip)
    for r in shown:
        r["label"] = label_dict(labels.get(r["index"]))
        r["auto_name"] = stats[r["index"]].auto_name if r["index"] in stats else None
        r["examples"] = strips.get(r["index"], [])
    n = len(firings)
    return {"images": n, "without": len(without), "n_active": len(rows), "in_all": sum(r["images"] == n for r in rows), "features": shown}
