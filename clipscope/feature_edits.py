"""Feature edits as a request or a config names them (``1234=0, 567*3``): read and checked without
torch, so the explorer's pages and the API's validation need no model. :mod:`clipscope.steering`
makes them in the residual stream."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


MAX_EDITS = 32
"""Most features one question may edit."""
MAX_EDIT_VALUE = 1e4
"""Largest activation or factor an edit may name (the study's largest activations are tens)."""
EDIT_SYNTAX = "feature=value (set its activation) or feature*factor (scale it where it fires), e.g. 1234=0, 567*3"
_EDIT = re.compile(r"#?(\d+)\s*([=*×x])\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


class EditError(ValueError):
    """Edits that cannot be read or made; the message says why."""


@dataclass(frozen=True)
class Edit:
    """One feature's new activation."""

    feature: int
    value: float
    scale: bool = False
    """False: the feature's activation becomes ``value`` at every token the SAE reads (the CLS token for
    a CLS SAE), firing or not; True: its activation is multiplied by ``value`` where it fires."""


def parse_edits(text: str | None, d_sae: int) -> tuple[Edit, ...]:
    """Edits separated by commas or new lines, each ``feature=value`` (its activation becomes
    ``value`` at every token the SAE reads) or ``feature*factor`` (also ``x`` or ``×``: its activation
    times ``factor`` where it fires); a leading ``#`` is allowed. Raises :class:`EditError`."""
    entries = [e.strip() for e in re.split(r"[,\n]", text or "") if e.strip()]
    if len(entries) > MAX_EDITS:
        raise EditError(f"Edit at most {MAX_EDITS} features ({len(entries)} given).")
    out: dict[int, Edit] = {}
    for entry in entries:
        m = _EDIT.fullmatch(entry)
        if not m:
            raise EditError(f"Cannot read the edit {entry[:40]!r}: write {EDIT_SYNTAX}.")
        feature, op, value = int(m[1]), m[2], float(m[3])
        if feature >= d_sae:
            raise EditError(f"Feature {feature} does not exist: this SAE has features 0 to {d_sae - 1}.")
        if not math.isfinite(value) or abs(value) > MAX_EDIT_VALUE:
            raise EditError(f"The edit {entry!r} names a value beyond ±{MAX_EDIT_VALUE:g}.")
        if feature in out:
            raise EditError(f"Feature {feature} is edited twice.")
        out[feature] = Edit(feature, value, scale=op != "=")
    return tuple(out.values())
