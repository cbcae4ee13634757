"""What fires on one image, and the firing features ranked as the analyze page and the API show them.

An upload's :class:`Analysis` comes from :class:`backend.services.analyze.Analyzer`; an image of the
precompute set's :class:`Firing` from its activation cache. This module imports no torch: the
app imports it before it serves, and torch after (:mod:`backend.services.lazy_analyzer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image
from sqlalchemy.orm import Session

from backend.services.features import label_dict, labels_of, maxima_of, top_examples
from clipscope.db.models import Sae

if TYPE_CHECKING:
    import torch

    from clipscope.attribution import Explanation
    from clipscope.steering import Steering


@dataclass
class Firing:
    """The features that fire on one image, and where."""

    activations: dict[int, float]
    """``{feature: activation}`` of the features that fire (max over the SAE's tokens)."""
    token_maps: torch.Tensor | None = None
    """``[len(activations), tokens]``, rows in the order of ``activations``: each firing feature's
    activation on every token the SAE reads; None for a CLS-only SAE."""
    _rows: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def _row(self, feature: int) -> int:
        if not self._rows:
            self._rows = {f: i for i, f in enumerate(self.activations)}
        return self._rows[feature]

    def token_map(self, feature: int) -> list[float] | None:
        """``feature``'s activation on each token as fractions of its activation on the image (as stored for top examples)."""
        if self.token_maps is None or feature not in self.activations:
            return None
        return (self.token_maps[self._row(feature)] / self.activations[feature]).tolist()

    def occlusion_map(self, feature: int) -> list[float] | None:
        """How much greying out each patch lowers ``feature`` (see :class:`Analysis`); None: not measured."""
        return None


@dataclass
class Analysis(Firing):
    """One analysed image: the features that fire, where they fire, and the model input it became."""

    model_view: Image.Image | None = None
    """What CLIP saw: the resized, cropped image (normalisation undone)."""
    occluded: torch.Tensor | None = None
    """With occlusion asked for, ``[len(activations), patches]``: each firing feature's activation on
    the image with one patch greyed out (``clipscope.token_maps.occlusions``, row-major); else None."""
    explanation: Explanation | None = None
    """With an explanation asked for, the zero-shot prediction and the features it rests on."""
    steering: Steering | None = None
    """With edits asked for, the zero-shot prediction before and after them."""

    def occlusion_map(self, feature: int) -> list[float] | None:
        """How much greying out each patch lowers ``feature``, as fractions of its activation (negative: it rises)."""
        if self.occluded is None or feature not in self.activations:
            return None
        act = self.activations[feature]
        return ((act - self.occluded[self._row(feature)].double()) / act).tolist()



def rank_features(session: Session, sae: Sae, analysis: Firing, limit: int = 30, strip: int = 6) -> dict[str, Any]:
    """The firing features ranked by activation and by activation relative to the feature's own maximum,
    each with where on the image it fires (``token_map``, None for a CLS-only SAE) and, when occlusion
    was asked for, how much greying out each patch lowers it (``occlusion_map``)."""
    acts = analysis.activations
    stats = maxima_of(session, sae.id, list(acts))  # plain rows, no JSON columns
    entries = []
    for f, a in acts.items():
        mx = stats[f].max_activation if f in stats else 0.0
        entries.append({"index": f, "activation": a, "relative": a / mx if mx > 0 else None, "max_activation": mx})
    by_act = sorted(entries, key=lambda e: (-e["activation"], e["index"]))[:limit]
    by_rel = sorted((e for e in entries if e["relative"] is not None), key=lambda e: (-e["relative"], e["index"]))[:limit]
    shown = {e["index"]: e for e in by_act + by_rel}  # a feature in both rankings is one dict: filled once, and only these
    ids = sorted(shown)
    labels, strips = labels_of(session, sae.id, ids), top_examples(session, sae.id, ids, limit=strip)
    for f, e in shown.items():
        e.update(frequency=stats[f].frequency if f in stats else None, label=label_dict(labels.get(f)),
                 auto_name=stats[f].auto_name if f in stats else None, examples=strips.get(f, []),
                 token_map=analysis.token_map(f), occlusion_map=analysis.occlusion_map(f))
    return {"n_active": len(entries), "by_activation": by_act, "by_relative": by_rel}
