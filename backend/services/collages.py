"""A feature's collage of top images (the study's 4 x 3), rendered once per set of examples and kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipscope.collage import cached_collage
from clipscope.db.models import Sae
from clipscope.errors import ClipScopeError
from clipscope.storage import DataLayout
from clipscope.veils import veil_image


def feature_collage(data_dir: Path, sae: Sae, detail: dict[str, Any], veil: bool = True) -> Path:
    """The PNG of :func:`backend.services.features.feature_detail`'s top images with their activations,
    each veiled where the feature does not fire (SAEs over patch tokens) unless ``veil`` is off.
    Raises ClipScopeError naming the thumbnail this server lacks."""
    layout = DataLayout(data_dir)
    try:
        return cached_collage(
            layout.collages / sae.key,
            [data_dir / e["thumbnail"].lstrip("/") for e in detail["top"]],
            [e["activation"] for e in detail["top"]],
            title=f"{sae.key} feature {detail['index']}",
            veils=[veil_image(e["token_map"], sae.tokens) if veil and e["token_map"] else None for e in detail["top"]],
        )
    except FileNotFoundError as exc:  # a database moved without its data dir's thumbnails/
        raise ClipScopeError(f"The thumbnail {exc.filename} is missing on this server: {layout.thumbnails} must hold "
                             "every thumbnail the database names (copy it with the database).") from None
