"""Rows as CSV text, the one format every export in the API shares."""

from __future__ import annotations

import csv
import io
from typing import Any, Iterable, Sequence


def csv_text(rows: Iterable[dict[str, Any]], fields: Sequence[str]) -> str:
    """A header of ``fields``, then one line per row (keys beyond ``fields`` ignored, missing ones and None empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
