"""An uploaded image's zero-shot prediction and SAE features: explain it by the features it rests on,
or edit features and see what CLIP then predicts. What the analyzer is asked (:class:`Question`,
checked before the upload is queued) and the answers as the API returns them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from backend.services.features import feature_cards
from clipscope.db.models import Sae
from clipscope.feature_edits import Edit, EditError, parse_edits

if TYPE_CHECKING:  # the answers' types: computed with torch, which this module does not import
    from clipscope.attribution import Explanation
    from clipscope.steering import Steering

MAX_CLASSES = 100
"""Most classes a request may name: each is encoded by CLIP's text tower with every prompt template
(18 for the default 'clip_cifar'), about 0.1 s a class on 2 CPU cores the first time."""
MAX_CLASS_CHARS = 100
MEASURED = 24
"""Features one explanation measures by removing them, unless asked otherwise: about 0.15 s on 2 CPU cores."""
MAX_MEASURED = 200
TOP_CLASSES = 5


class BadQuestion(ValueError):
    """The classes, target, contrast class or edits of a request are unusable; the message says
    why and ``field`` names the request field at fault."""

    def __init__(self, message: str, field: str = "classes", value: str | None = None):
        super().__init__(message)
        self.field, self.value = field, value


@dataclass(frozen=True)
class Question:
    """What to ask of the zero-shot prediction over ``classes``: explain it (of clean CLIP's top
    class, or of ``target``; with a ``contrast`` class, the target's margin over it), and with
    ``edits``, what it becomes when those features are edited in the stream."""

    classes: tuple[str, ...]
    target: int | None = None
    source: str = "dataset"
    """'dataset' (the precompute dataset's classes) or 'request' (named in the request)."""
    contrast: int | None = None
    measure: int = MEASURED
    """How many features are measured by removing them (the largest first-order estimates)."""
    explain: bool = True
    edits: tuple[Edit, ...] = ()


def dataset_classes(sae: Sae) -> list[str]:
    return list((sae.precompute or {}).get("classes") or [])


def question_for(sae: Sae, explain: bool, edits: str | None, classes: str | None, target: str | None, contrast: str | None = None,
                 measure: int = MEASURED) -> Question | None:
    """The question from the request's fields, None when it asks neither an explanation nor edits.

    ``edits`` as :func:`clipscope.feature_edits.parse_edits` reads them; ``classes`` separated by commas or new lines
    (default: the precompute dataset's classes), ``target`` one of them (default: CLIP's top class),
    ``contrast`` another one (default: none). Raises :class:`BadQuestion`.
    """
    try:
        edited = parse_edits(edits, sae.d_sae)
    except EditError as exc:
        raise BadQuestion(str(exc), "edits", edits) from None
    if not explain and not edited:
        return None
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
    return Question(tuple(found), target_at, source, contrast_at, measure, explain, edited)


def _class_at(classes: list[str], name: str | None, role: str) -> int | None:
    if name is None or not name.strip():
        return None
    if name.strip() not in classes:
        raise BadQuestion(f"The {role} class {name.strip()!r} is not one of the classes explained over.", role, name)
    return classes.index(name.strip())


def _ranked(classes: list[str], probs) -> list[dict[str, Any]]:
    return [{"class": classes[i], "probability": float(probs[i])} for i in probs.argsort(descending=True)[:TOP_CLASSES].tolist()]


def prediction_dict(session: Session, sae: Sae, question: Question, ex: Explanation, strip: int = 4) -> dict[str, Any]:
    """The prediction, clean and spliced, and the measured features with their labels and top images."""
    name = ex.classes.__getitem__
    cards = feature_cards(session, sae.id, [e.index for e in ex.effects], strip)
    return {
        "classes_from": question.source,
        "n_classes": len(ex.classes),
        "target": name(ex.target),
        "contrast": name(ex.contrast) if ex.contrast is not None else None,
        "target_probability": {"clean": float(ex.clean[ex.target]), "spliced": float(ex.spliced[ex.target])},
        "clean": _ranked(ex.classes, ex.clean),
        "spliced": _ranked(ex.classes, ex.spliced),
        "n_estimated": len(ex.estimates),
        "features": [{
            "index": e.index, "activation": e.activation, "logit_change": e.logit_change, "estimate": e.estimate,
            "probability": e.probability, "top_class": name(e.top_class), **cards[e.index],
        } for e in ex.effects],
    }


def steering_dict(session: Session, sae: Sae, question: Question, st: Steering, strip: int = 4) -> dict[str, Any]:
    """The prediction clean and after the edits, the classes the edits moved most, and each edit with
    the feature's activation before and after, its label and top images."""
    target = question.target if question.target is not None else int(st.clean.argmax())
    moved = (st.steered - st.clean).abs().argsort(descending=True)[:TOP_CLASSES].tolist()
    cards = feature_cards(session, sae.id, [e.feature for e in st.edits], strip)
    return {
        "classes_from": question.source,
        "n_classes": len(st.classes),
        "target": st.classes[target],
        "target_probability": {"clean": float(st.clean[target]), "steered": float(st.steered[target])},
        "target_logit_change": float(st.logit_change[target]),
        "clean": _ranked(st.classes, st.clean),
        "steered": _ranked(st.classes, st.steered),
        "moved": [{"class": st.classes[i], "clean": float(st.clean[i]), "steered": float(st.steered[i]),
                   "logit_change": float(st.logit_change[i])} for i in moved],
        "edits": [{
            "index": e.feature, "op": "scale" if e.scale else "set", "value": e.value, "before": before, "after": after,
            **cards[e.feature],
        } for e, before, after in zip(st.edits, st.before, st.after)],
    }
