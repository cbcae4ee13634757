"""A feature's closest features in the other ready SAEs at the same hook site (same CLIP model and
weights, same block), by decoder cosine (:mod:`clipscope.matching`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.services.features import feature_cards
from backend.services.recently_used import RecentlyUsed
from clipscope.db.models import Sae, SaeStatus
from clipscope.errors import ClipScopeError
from clipscope.overlap_rows import chance_level

if TYPE_CHECKING:
    import torch

_SAME_SITE = select(Sae).where(Sae.status == SaeStatus.READY).order_by(Sae.created_at.desc(), Sae.id.desc())


class Matches:
    """Keeps the unit-length decoder atoms of the ``capacity`` most recently matched SAEs (float32:
    150 MB for 49,152 x 768), keyed by the SAE row's version, so a retrained SAE is read again."""

    def __init__(self, data_dir: Path, capacity: int = 3):
        self.data_dir = Path(data_dir)
        self._atoms: RecentlyUsed[torch.Tensor] = RecentlyUsed(capacity)

    def atoms(self, sae: Sae) -> torch.Tensor:
        from clipscope.matching import unit_atoms  # torch, imported with the first match
        from clipscope.sae.io import load_sae

        load = lambda: unit_atoms(load_sae(self.data_dir / "saes" / sae.key / "sae")[0].W_dec)  # noqa: E731
        return self._atoms.get((sae.key, sae.updated_at), load)

    def others(self, session: Session, sae: Sae) -> list[Sae]:
        """The other ready SAEs whose atoms share ``sae``'s space, newest first."""
        return [o for o in session.scalars(_SAME_SITE)
                if o.id != sae.id and (o.model, o.pretrained, o.layer, o.d_in) == (sae.model, sae.pretrained, sae.layer, sae.d_in)]

    def of(self, session: Session, sae: Sae, idx: int, k: int = 3, strip: int = 4) -> list[dict[str, Any]]:
        """Per other SAE at the site: its ``k`` features closest to feature ``idx``, each with its
        cosine, label, automatic name and top images; an SAE whose files this server lacks says so
        (``unavailable``). Raises ClipScopeError when ``sae``'s own files are missing."""
        out = []
        others = self.others(session, sae)
        if not others:
            return out
        from clipscope.matching import best_matches

        atom = self.atoms(sae)[idx]
        for other in others:
            entry = {"sae": other.key, "name": other.name, "recipe": other.recipe, "tokens": other.tokens, "d_sae": other.d_sae,
                     "chance": chance_level(other.d_sae, other.d_in), "features": [], "unavailable": None}
            try:
                found = best_matches(atom, self.atoms(other), k)
            except ClipScopeError as exc:
                entry["unavailable"] = str(exc)
            else:
                cards = feature_cards(session, other.id, [f for f, _ in found], strip)
                entry["features"] = [{"index": f, "cosine": c, **cards[f]} for f, c in found]
            out.append(entry)
        return out
