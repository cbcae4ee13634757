"""Image rows shared by every SAE over the same images: one row per (dataset key, index)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from clipscope.db.bulk import insert_rows
from clipscope.db.models import Image


def upsert_images(session: Session, rows: list[dict[str, Any]]) -> tuple[dict[tuple[str, int], int], int]:
    """Insert the image ``rows`` (column values) not yet here, in the session's transaction; returns every
    row's id keyed by ``(dataset_key, index)``, and how many were inserted.

    Each dataset's ids are read whole, before and after the insert, rather than asked for by
    ``IN (...)`` lists or returned by the insert: psycopg parses anew each statement of over 50
    parameters, and at the Food-101 size on PostgreSQL the precompute's 152 lists of 500 and its
    returning insert's batches cost 10 s of a 44 s write (docs/benchmarks.md)."""
    keys = sorted({row["dataset_key"] for row in rows})

    def known() -> dict[tuple[str, int], int]:
        found = session.execute(select(Image.dataset_key, Image.index, Image.id).where(Image.dataset_key.in_(keys)))
        return {(dkey, idx): img_id for dkey, idx, img_id in found}

    ids = known()
    added = insert_rows(session, Image.__table__, (row for row in rows if (row["dataset_key"], row["index"]) not in ids))
    return (known() if added else ids), added
