"""ClipScope's SAEs from Python, for a notebook: an SAE with its CLIP, what it makes of any image, and its
activations over the image set it was precomputed on (the numbers its pages show).

    from clipscope.notebook import open_sae, saes
    saes()                                   # what `clipscope saes list` shows
    s = open_sae("seed-0123456789")          # the SAE's row, weights and config; CLIP loads on first use
    acts = s.encode(["cat.jpg", pil_image])  # [2, d_sae]: each feature's activation on each image
    on_set = s.set_activations([1234, 567])  # over the precompute set: .values [n_images, 2], .indices, .labels
    picture, label = s.dataset()[int(on_set.values[:, 0].argmax())]
    s.collage(1234)                          # its top images, as the study's 4 x 3 collage
    s.features()                             # every feature's statistics and current label (the list's columns)
    s.shared(["a.jpg", "b.jpg"], without=["c.jpg"])  # the features those images share, as the "several images" page ranks them

An image's activation of a feature is its maximum over the tokens the SAE reads, as on every page.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sqlalchemy import select

from clipscope.activation_cache import ActivationCache, open_precompute_cache
from clipscope.clip.hooks import residual_at, token_slice
from clipscope.clip.loading import LoadedClip, load_clip
from clipscope.clip.preprocess import ImagePreprocess, preprocess_descriptor
from clipscope.collage import render_collage
from clipscope.config import RunConfig, parse_config
from clipscope.datasets.base import Selection, build_dataset
from clipscope.db import migrate
from clipscope.db.models import FEATURE_STAT_NAMES, FEATURE_STATS, Feature, Label, Sae, SaeStatus
from clipscope.db.session import session_scope
from clipscope.errors import ClipScopeError
from clipscope.image_sets import rank_set
from clipscope.inventory import SaeEntry, list_saes, sae_row
from clipscope.sae.io import load_sae
from clipscope.sae.model import TopKSAE
from clipscope.set_screen import Thresholds, candidate_images, row_thresholds
from clipscope.settings import Settings, get_settings
from clipscope.storage import DataLayout
from clipscope.token_maps import firing_entries

ImageLike = Image.Image | str | Path


def _settings(data_dir: str | Path | None) -> Settings:
    settings = get_settings()
    return settings.model_copy(update={"data_dir": Path(data_dir)}) if data_dir is not None else settings


def _database(settings: Settings) -> str:
    """The database URL, checked to be at the code's revision (a notebook reads; it never migrates)."""
    url = settings.resolved_database_url
    migrate.require_current(url)
    return url


def saes(data_dir: str | Path | None = None) -> list[SaeEntry]:
    """Every SAE of the database and data dir (``CLIPSCOPE_*`` settings, or ``data_dir``), newest first."""
    settings = _settings(data_dir)
    with session_scope(_database(settings)) as session:
        return list_saes(session, DataLayout(settings.data_dir))


@dataclass(frozen=True)
class SetActivations:
    """Features' activations over an SAE's precompute image set, one row per image in the cache's order."""

    values: np.ndarray | torch.Tensor
    """``float32 [n_images, len(features)]``; for all features, a sparse COO tensor ``[n_images, d_sae]``."""
    features: list[int] | None
    """The features of ``values``' columns; None when they are all of them, in index order."""
    indices: np.ndarray
    """Each row's index in its dataset (``dataset()[row]`` reads it back)."""
    labels: np.ndarray
    """Each row's class index (-1: none)."""
    classes: list[str]


class OpenedSae:
    """One SAE: its database row, config and weights; its CLIP on first use. Made by :func:`open_sae`."""

    def __init__(self, row: Sae, settings: Settings, device: str):
        self.row, self.settings, self.device = row, settings, device
        self.layout = DataLayout(settings.data_dir)
        self.config: RunConfig = parse_config(row.config)
        folder = self.layout.saes / row.key / "sae"
        if not (folder / "cfg.json").is_file():
            raise ClipScopeError(f"The weights of SAE {row.key} are not on this machine ({folder}): copy its folder from "
                                 "the data dir it was trained in, or run `clipscope train` with its config here.")
        self.sae: TopKSAE
        self.sae, self.meta = load_sae(folder, device)
        self.sae.eval()

    @property
    def key(self) -> str:
        return self.row.key

    def __repr__(self) -> str:
        return f"<OpenedSae {self.key}: {self.row.d_sae:,} latents, k = {self.row.k}, block {self.config.model.layer} {self.config.model.tokens}>"

    @cached_property
    def clip(self) -> LoadedClip:
        """The CLIP the SAE reads (its weights as the config names them; a download only where allowed)."""
        return load_clip(self.config.model, self.device, cache_dir=self.layout.models)

    @cached_property
    def preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(preprocess_descriptor(self.config.model))

    @torch.inference_mode()
    def residual(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """``[n, tokens, d]``: the residual stream at the SAE's block, at the tokens it reads (the SAE's input)."""
        batch = self.preprocess([_rgb(image) for image in images], self.device)
        return residual_at(self.clip.visual, batch, self.config.model.layer)[:, token_slice(self.config.model.tokens)]

    @torch.inference_mode()
    def encode_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, tokens, d]`` SAE inputs (a residual, or rows of an activation cache) -> ``float32 [n, d_sae]`` on
        the CPU: each feature's activation on each image, the maximum over its tokens."""
        img, feat, val, _ = firing_entries(self.sae, x, maps=False)
        out = torch.zeros(x.shape[0], self.sae.d_sae)
        out[img, feat] = val
        return out

    def encode(self, images: Sequence[ImageLike], batch_size: int = 32) -> torch.Tensor:
        """``float32 [len(images), d_sae]``: each feature's activation on each image (PIL images or paths),
        through CLIP to the SAE's block and the SAE, ``batch_size`` images at a time."""
        parts = [self.encode_inputs(self.residual(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.sae.d_sae)

    def _require_precompute(self) -> None:
        if self.row.status != SaeStatus.READY:
            raise ClipScopeError(f"SAE {self.key} has no precompute yet (status: {self.row.status}); run `clipscope precompute` first.")

    def cache(self) -> ActivationCache:
        """The activation cache of the SAE's precompute set (the inputs the pages' numbers come from)."""
        self._require_precompute()
        return open_precompute_cache(self.settings.data_dir, self.row)

    @torch.inference_mode()
    def set_activations(self, features: Sequence[int] | None = None, batch_size: int = 2048) -> SetActivations:
        """The features' activations on every image of the precompute set: dense ``[n_images, len(features)]``,
        or for ``features=None`` every feature as a sparse COO tensor (at most k entries an image).

        The first call encodes the whole set and keeps each row's top-k threshold (``clipscope.set_screen``);
        later calls for a few features encode only the images where one of them may fire: the same images fire,
        with the same values to the products' rounding."""
        cache = self.cache()
        acts = cache.activations()
        wanted = None if features is None else torch.as_tensor([int(f) for f in features], dtype=torch.long)
        if wanted is not None and len(wanted) and not (0 <= int(wanted.min()) and int(wanted.max()) < self.sae.d_sae):
            raise ClipScopeError(f"Features must lie in 0..{self.sae.d_sae - 1} for SAE {self.key}.")
        distinct, inverse = (None, None) if wanted is None else torch.unique(wanted, return_inverse=True)  # asked twice: twice
        dense = np.zeros((cache.n_images, 0 if wanted is None else len(distinct)), dtype=np.float32)
        column = torch.full((self.sae.d_sae,), -1, dtype=torch.long)  # each distinct feature's column of ``dense``
        if wanted is not None:
            column[distinct] = torch.arange(len(distinct))
        kept = Thresholds(self.layout.saes / self.key / "set-thresholds", str((self.row.precompute or {}).get("key")), acts.shape[0] * acts.shape[1])
        screen = kept.load() if wanted is not None else None
        if screen is not None:
            candidates = candidate_images(self.sae, acts, distinct, screen, batch_size)
            batches = [candidates[i : i + batch_size] for i in range(0, len(candidates), batch_size)]
        else:
            batches = [slice(start, start + batch_size) for start in range(0, cache.n_images, batch_size)]
        rows, cols, vals, thresholds = [], [], [], []
        for batch in batches:
            x = torch.from_numpy(np.asarray(acts[batch], dtype=np.float32)).to(self.device)
            code = self.sae.encode(x.reshape(-1, x.shape[-1]))
            if screen is None:
                thresholds.append(row_thresholds(code))
            img, feat, val, _ = firing_entries(self.sae, x, maps=False, code=code)
            img = img + batch.start if isinstance(batch, slice) else torch.from_numpy(batch)[img]
            if wanted is None:
                rows.append(img)
                cols.append(feat)
                vals.append(val)
                continue
            keep = column[feat] >= 0
            dense[img[keep].numpy(), column[feat[keep]].numpy()] = val[keep].numpy()
        if screen is None and thresholds:
            kept.save(torch.cat(thresholds).numpy())
        if wanted is None:
            index = torch.stack([torch.cat(rows), torch.cat(cols)]) if rows else torch.zeros(2, 0, dtype=torch.long)
            values = torch.sparse_coo_tensor(index, torch.cat(vals) if vals else torch.zeros(0), (cache.n_images, self.sae.d_sae), check_invariants=False).coalesce()
        else:
            values = dense[:, inverse.numpy()]
        classes = list((self.row.precompute or {}).get("classes") or [])
        return SetActivations(values, None if wanted is None else wanted.tolist(), np.asarray(cache.indices()), np.asarray(cache.labels()), classes)

    def features(self) -> list[dict]:
        """Every feature's statistics over the precompute set and its current label, in index order, as plain
        dicts (``pandas.DataFrame(s.features())`` makes a table of them): what the feature list shows."""
        with session_scope(_database(self.settings)) as session:
            rows = session.execute(select(*FEATURE_STATS).where(Feature.sae_id == self.row.id).order_by(Feature.idx)).all()
            labels = {r.feature: r for r in session.execute(
                select(Label.feature, Label.text, Label.category, Label.author, Label.revision).where(Label.sae_id == self.row.id))}
        out = []
        for r in rows:
            label = labels.get(r.idx)
            out.append({**dict(zip(FEATURE_STAT_NAMES, r)),
                        "label": label.text if label else None, "category": label.category if label else None,
                        "author": label.author if label else None, "revision": label.revision if label else None})
        return out

    def shared(self, images: Sequence[ImageLike], without: Sequence[ImageLike] = (), limit: int | None = 30) -> list[dict]:
        """Which features ``images`` share, ranked as the explorer's "several images" page ranks them
        (:func:`clipscope.image_sets.rank_set`: by how many of the images each fires on, then by lift over its
        frequency on the precompute set; with counter-examples ``without``, by contrast): the first ``limit`` rows
        (every one with None), each with the feature's automatic name and current label."""
        if not images:
            raise ClipScopeError("Give at least one image to find the features it shares.")
        self._require_precompute()
        acts = self.encode([*images, *without])
        per_image = [dict(zip(nz.tolist(), row[nz].tolist())) for row in acts for nz in [row.nonzero().flatten()]]
        features = sorted({f for image in per_image[: len(images)] for f in image})
        with session_scope(_database(self.settings)) as session:
            stats = {r.idx: r for r in session.execute(select(Feature.idx, Feature.max_activation, Feature.frequency, Feature.auto_name)
                                                       .where(Feature.sae_id == self.row.id, Feature.idx.in_(features)))}
            rows = rank_set(per_image[: len(images)], per_image[len(images) :], {f: (r.max_activation, r.frequency) for f, r in stats.items()})
            rows = rows[:limit] if limit is not None else rows
            labels = {r.feature: r for r in session.execute(select(Label.feature, Label.text, Label.category).where(
                Label.sae_id == self.row.id, Label.feature.in_([r["index"] for r in rows])))}
        for r in rows:
            label, stat = labels.get(r["index"]), stats.get(r["index"])
            r.update(auto_name=stat.auto_name if stat else None, label=label.text if label else None, category=label.category if label else None)
        return rows

    def top(self, feature: int, k: int = 12) -> list[tuple[int, float]]:
        """The rows of the precompute set the feature fires on most, ``(row, activation)``, highest first (at
        most ``k``; the feature page's top images, recomputed from the cache)."""
        values = self.set_activations([feature]).values[:, 0]
        return [(int(r), float(values[r])) for r in np.argsort(-values, kind="stable")[:k] if values[r] > 0]

    def collage(self, feature: int, k: int = 12) -> Image.Image:
        """The feature's top images with their activations as the study's 4 x 3 collage (a notebook shows it)."""
        dataset, top = self.dataset(), self.top(feature, k)
        png = render_collage([dataset[row][0] for row, _ in top], [a for _, a in top], title=f"{self.key} feature {feature}")
        return Image.open(io.BytesIO(png))

    def dataset(self) -> Selection:
        """The precompute image set: ``dataset()[row]`` is ``(PIL image, class index)`` of a row of
        :meth:`set_activations` (its dataset files must be on this machine; nothing is downloaded)."""
        return build_dataset(self.config.precompute_data, self.layout.datasets, allow_download=False)


def _rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


def open_sae(key: str, data_dir: str | Path | None = None, device: str | None = None) -> OpenedSae:
    """The SAE ``key`` of the database and data dir (``CLIPSCOPE_*`` settings, or ``data_dir``), on ``device``
    (default: ``CLIPSCOPE_DEVICE``)."""
    settings = _settings(data_dir)
    with session_scope(_database(settings)) as session:
        row = sae_row(session, key)
        session.expunge(row)
    return OpenedSae(row, settings, device or settings.resolved_device())
