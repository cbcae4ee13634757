"""The analyze page's recent images, kept as CLIP saw them, so the same image can be asked about
again (other edits, an explanation, occlusion) without uploading it again.

What is kept is the model input's pixels (the resized, centre-cropped image, normalisation undone):
224 x 224 RGB, ~150 KB, where the upload itself may be 20 MB. Analysing it again is exact, because the
model input lies on the same uint8 grid (both resize paths end there) and resizing an image that
already has the model's size leaves it as it is.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from PIL import Image

from backend.services.recently_used import RecentlyUsed


@dataclass(frozen=True)
class Kept:
    sae_key: str
    filename: str
    view: Image.Image


class KeptUploads:
    """The ``capacity`` most recently used images, each under a random token (unguessable, so a
    token is as private as the page that shows it)."""

    def __init__(self, capacity: int):
        self._store: RecentlyUsed[Kept] = RecentlyUsed(capacity)

    def keep(self, sae_key: str, filename: str, view: Image.Image) -> str:
        token = secrets.token_urlsafe(16)
        self._store.get(token, lambda: Kept(sae_key, filename, view))
        return token

    def find(self, sae_key: str, token: str) -> Kept | None:
        """The image kept under ``token`` for this SAE, or None (never kept, or gone since)."""
        kept = self._store.find(token) if token else None
        return kept if kept is not None and kept.sae_key == sae_key else None
