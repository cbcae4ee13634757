"""An image of an SAE's precompute set, seen from the SAE: every feature it fires (from the
precompute's activation cache, so the numbers are the precompute's own) and the features it is an
example of. The way back from a feature's top image to everything else that image holds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.services.firing import Firing, rank_features
from backend.services.features import label_dict, labels_of, maxima_of
from backend.services.recently_used import RecentlyUsed
from clipscope.activation_cache import ActivationCache, open_precompute_cache
from clipscope.config import parse_config
from clipscope.datasets.base import Selection, build_dataset
from clipscope.db.models import FeatureExample, Image, Sae
from clipscope.errors import ClipScopeError
from clipscope.storage import DataLayout
from clipscope.thumbnails import content_hash

if TYPE_CHECKING:
    from backend.services.analyze import Analyzer


class NotInSet(LookupError):
    """No such image, or not one of the SAE's precompute set: the sentence says which."""


def _not_in_set(sae: Sae, image: Image) -> NotInSet:
    return NotInSet(f"Image {image.id} ({image.dataset} {image.split} #{image.index}) is not in the image set SAE {sae.key} was precomputed over.")


class DatasetImages:
    """Reads the SAE's inputs for an image from its precompute's activation cache (kept open, with its
    dataset indices, for the ``capacity`` most recently asked caches) and encodes them with the SAE
    the analysis keeps (:meth:`Analyzer.firing`), on the analysis device; reads the image itself from the
    precompute's dataset when it is to be analysed."""

    def __init__(self, data_dir: Path, analyzer: Analyzer, capacity: int = 4):
        self.data_dir, self.analyzer = Path(data_dir), analyzer
        self._caches: RecentlyUsed[tuple[ActivationCache, np.ndarray]] = RecentlyUsed(capacity)
        self._datasets: RecentlyUsed[Selection] = RecentlyUsed(2)  # CIFAR's pickles are read whole: ~180 MB

    def image(self, session: Session, sae: Sae, image_id: int) -> Image:
        """The image row; :class:`NotInSet` when it is not an image of the SAE's precompute set."""
        image = session.get(Image, image_id)
        if image is None:
            raise NotInSet(f"There is no image {image_id}.")
        images_key = (sae.precompute or {}).get("images")
        if images_key:
            belongs = image.dataset_key == images_key
        else:  # a precompute before the key was recorded: only its examples are known to be of its set
            example = select(FeatureExample.id).where(FeatureExample.sae_id == sae.id, FeatureExample.image_id == image_id).limit(1)
            belongs = session.scalar(example) is not None
        if not belongs:
            raise _not_in_set(sae, image)
        return image

    def firing(self, sae: Sae, image: Image) -> Firing:
        """Every feature the image fires, with its token map for an SAE over several tokens."""
        cache, indices = self._cache(sae)
        rows = np.flatnonzero(indices == image.index)
        if not len(rows):
            raise _not_in_set(sae, image)
        return self.analyzer.firing(sae, np.asarray(cache.activations()[int(rows[0])], dtype=np.float32).reshape(cache.tokens_per_image, cache.d))

    def pixels(self, sae: Sae, image: Image) -> PILImage.Image:
        """The image itself, read again from the SAE's precompute dataset on this server, to analyse it as an
        upload. Raises ClipScopeError when the dataset's files are not here, or hold other pixels than the
        precompute saw (their content hash differs)."""
        dataset = self._datasets.get((sae.key, sae.updated_at), lambda: self._dataset(sae))
        try:
            picture, _ = dataset.base[image.index]
        except (IndexError, OSError) as exc:
            raise ClipScopeError(f"{image.dataset} {image.split} image {image.index} cannot be read on this server: {exc}") from None
        if content_hash(picture) != image.content_hash:
            raise ClipScopeError(f"{dataset.base.where(image.index)} on this server is not the image the precompute saw (its pixels differ).")
        return picture

    def _dataset(self, sae: Sae) -> Selection:
        spec = parse_config(sae.config).precompute_data
        return build_dataset(spec, DataLayout(self.data_dir).datasets, allow_download=False)

    def _cache(self, sae: Sae) -> tuple[ActivationCache, np.ndarray]:
        def open_cache() -> tuple[ActivationCache, np.ndarray]:
            cache = open_precompute_cache(self.data_dir, sae)
            return cache, np.asarray(cache.indices())

        return self._caches.get((sae.precompute or {}).get("cache"), open_cache)

    def of(self, session: Session, sae: Sae, image_id: int, limit: int = 30, strip: int = 6) -> dict[str, Any]:
        """The image, where it is an example, and the features it fires ranked as an upload's are
        (``ranked`` is None, with ``unavailable`` saying why, when this server lacks the cache)."""
        image = self.image(session, sae, image_id)
        shown = appearances(session, sae, image_id)
        try:
            ranked, unavailable = rank_features(session, sae, self.firing(sae, image), limit, strip), None
        except ClipScopeError as exc:
            ranked, unavailable = None, f"This server cannot tell which features image {image_id} fires: {exc}"
        return {"image": image_dict(image), "examples_of": shown, "ranked": ranked, "unavailable": unavailable}


def image_dict(image: Image) -> dict[str, Any]:
    return {"id": image.id, "dataset": image.dataset, "split": image.split, "index": image.index, "label": image.label,
            "class_name": image.class_name, "width": image.width, "height": image.height, "thumbnail": "/" + image.thumbnail}


def appearances(session: Session, sae: Sae, image_id: int) -> list[dict[str, Any]]:
    """Where the image is one of the SAE's examples: each feature's top images (``bucket`` -1, by
    ``rank`` from 0) first, then its interval samples, with the feature's label and automatic name."""
    found = session.execute(
        select(FeatureExample.feature, FeatureExample.bucket, FeatureExample.rank, FeatureExample.activation)
        .where(FeatureExample.sae_id == sae.id, FeatureExample.image_id == image_id)
        .order_by(FeatureExample.bucket, FeatureExample.rank, FeatureExample.feature)
    ).all()
    ids = sorted({r.feature for r in found})
    stats, labels = maxima_of(session, sae.id, ids), labels_of(session, sae.id, ids)
    return [{"index": r.feature, "bucket": r.bucket, "rank": r.rank, "activation": r.activation,
             "label": label_dict(labels.get(r.feature)), "auto_name": stats[r.feature].auto_name if r.feature in stats else None}
            for r in found]
