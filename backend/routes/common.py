"""Helpers shared by the page and API routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import HTTPException, Path

from clipscope.db.models import Sae, SaeStatus


ImageId = Annotated[int, Path(ge=1, le=2**31 - 1, description="An image's id (an example's `image_id`).")]
"""Bounded as the database's integer column is (PostgreSQL's is 32-bit): a larger id is a 422, not a 500."""


def require_ready(sae: Sae) -> None:
    """Feature data exists only once the precompute committed; before that, say what state the SAE is in."""
    if sae.status != SaeStatus.READY:
        raise HTTPException(status_code=409, detail=f"SAE {sae.key} is not ready yet (status: {sae.status}); run `clipscope precompute`.")


def require_feature(sae: Sae, idx: int) -> None:
    if not 0 <= idx < sae.d_sae:
        raise HTTPException(status_code=404, detail=f"Feature {idx} does not exist (0..{sae.d_sae - 1}).")
