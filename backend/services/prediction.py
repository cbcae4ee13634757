"""Explain an uploaded image's zero-shot prediction by SAE features: what the analyzer is asked
(:class:`Explain`, checked before the upload is queued) and the answer as the API returns it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from backend.services.features import label_dict, labels_of, maxima_of, top_examples
from clipscope.attribution import Explanation
from clipscope.db.models import Sae

MAX_CLASSES = 100
"""Most classes a request may name: each is encoded by CLIP's text tower with every prompt template
(18 for the default 'clip_cifar'), about 0.1 s a class on 2 CPU cores the first time."""
MAX_CLASS_CHARS = 100
MEASURED = 24
"""Features one explanation measures by removing them, unless asked otherwise: about 0.15 s on 2 CPU cores."""
MAX_MEASURED = 200
TOP_CLASSES = 5


class BadQuestion(ValueError):
    """The classes, target or contrast class of an explanation request are unusable; the message says
    why and ``field`` names the request field at fault."""

    def __init__(self, message: str, field: str = "classes", value: str | None = None):
        super().__init__(message)
        self.field, self.value = field, value


@dataclass(frozen=True)
class Explain:
    """Explain the prediction over ``classes``: of clean CLIP's top class, or of ``target``; with a
    ``contrast`` class, the target's margin over it."""

    classes: tuple[str, ...]
    target: int | None = None
    source: str = "dataset"
    """'dataset' (the precompute dataset's classes) or 'request' (named in the request)."""
    contrast: int | None = None
    measure: int = MEASURED
    """How many features are measured by removing them (the largest first-order estimates)."""


def dataset_classes(sae: Sae) -> list[str]:
    return list((sae.precompute or {}).get("classes") or [])


def explain_request(sae: Sae, classes: str | None, target: str | None, contrast: str | None = None, measure: int = MEASURED) -> Explain:
    """The question from the request's fields: ``classes`` separated by commas or new lines (default:
    the precompute dataset's classes), ``target`` one of them (default: CLIP's top class), ``contrast``
    another one (default: none)."""
    named = [c.strip() for c in re.split(r"[,\n]", classes or "") if c.strip()]
    if named:
        if len(named) > MAX_CLASSES:
            raise BadQuestion(f"Name at most {MAX_CLASSES} classes ({len(named)} given).", value=classes)
        if too_long := [c for c in named if len(c) > MAX_CLASS_CHARS]:
            raise BadQuestion(f"A class name may have at most {MAX_CLASS_CHARS} characters: {too_long[0][:40]!r}...", value=classes)
        found, source = list(dict.fromkeys(named)), "request"
    else:
        found, source = dataset_classes(sae), "dataset"
        if not found:
            raise BadQuestion(
                f"SAE {sae.key}'s precompute knows no class names (its dataset has none, or it was precomputed before they "
                "were kept: `clipscope run` with its config keeps them); name the classes to explain over.", value=classes
            )
    if len(found) < 2:
        raise BadQuestion("Name at least two classes: a prediction over one class is certain.", value=classes)
    target_at, contrast_at = (_class_at(found, name, role) for name, role in ((target, "target"), (contrast, "contrast")))
    if contrast_at is not None and contrast_at == target_at:
        raise BadQuestion("The contrast class must differ from the target class.", "contrast", contrast)
    return Explain(tuple(found), target_at, source, contrast_at, measure)


def _class_at(classes: list[str], name: str | None, role: str) -> int | None:
    if name is None or not name.strip():
        return None
    if name.strip() not in classes:
        raise BadQuestion(f"The {role} class {name.strip()!r} is not one of the classes explained over.", role, name)
    return classes.index(name.strip())


def prediction_dict(session: Session, sae: Sae, question: Explain, ex: Explanation, strip: int = 4) -> dict[str, Any]:
    """The prediction, clean and spliced, and the measured features with their labels and top images."""
    name = ex.classes.__getitem__
    ranked = lambda probs: [{"class": name(i), "probability": float(probs[i])} for i in probs.argsort(descending=True)[:TOP_CLASSES].tolist()]  # noqa: E731
    ids = [e.index for e in ex.effects]
    stats, labels, strips = maxima_of(session, sae.id, ids), labels_of(session, sae.id, ids), top_examples(session, sae.id, ids, limit=strip)
    return {
        "classes_from": question.source,
        "n_classes": len(ex.classes),
        "target": name(ex.target),
        "contrast": name(ex.contrast) if ex.contrast is not None else None,
        "target_probability": {"clean": float(ex.clean[ex.target]), "spliced": float(ex.spliced[ex.target])},
        "clean": ranked(ex.clean),
        "spliced": ranked(ex.spliced),
        "n_estimated": len(ex.estimates),
        "features": [{
            "index": e.index, "activation": e.activation, "logit_change": e.logit_change, "estimate": e.estimate,
            "probability": e.probability, "top_class": name(e.top_class), "label": label_dict(labels.get(e.index)),
            "auto_name": stats[e.index].auto_name if e.index in stats else None,
            "examples": strips.get(e.index, []),
        } for e in ex.effects],
    }
