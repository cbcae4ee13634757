"""Live analysis: run CLIP to the SAE's hook site and the SAE on an uploaded image.

This module imports torch and open_clip; the app imports it once it serves
(:class:`backend.services.lazy_analyzer.LazyAnalyzer`), not before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipscope.attribution import Explanation, explain
from clipscope.clip.classifiers import kept_classifier
from clipscope.clip.hooks import residual_at, token_slice
from clipscope.clip.loading import LoadedClip, load_clip
from clipscope.clip.preprocess import ImagePreprocess, preprocess_descriptor
from clipscope.clip.zeroshot import build_classifier, template_set
from clipscope.config import ModelConfig
from clipscope.db.models import Sae
from clipscope.sae.io import load_sae
from clipscope.sae.model import SparseCode, TopKSAE
from clipscope.steering import Steering, steer
from clipscope.token_maps import firing_entries, occlusions

from backend.services.firing import Analysis, Firing
from backend.services.prediction import Question
from backend.services.recently_used import RecentlyUsed


class _Loaded:
    def __init__(self, clip: LoadedClip, sae: TopKSAE, model_cfg: ModelConfig):
        self.clip, self.sae, self.model_cfg = clip, sae, model_cfg
        self.preprocess = ImagePreprocess(preprocess_descriptor(model_cfg))


def _weights_of(model_cfg: ModelConfig) -> tuple:
    """What :func:`load_clip` builds from: SAEs at other blocks or tokens of the same CLIP share one."""
    return model_cfg.name, model_cfg.pretrained, str(model_cfg.weights_file), model_cfg.init_seed


class Analyzer:
    """Keeps the most recently used CLIPs and SAEs in memory (loading is seconds; analysis is not), and
    the most recently used zero-shot classifiers (encoding the class names is seconds too).

    A CLIP is kept per weights, so SAEs over the same CLIP share it; an SAE per version of its row,
    so a retrained SAE is read again."""

    def __init__(self, data_dir: Path, device: str, capacity: int = 2, classifiers: int = 8):
        self.data_dir, self.device = Path(data_dir), device
        self._clips: RecentlyUsed[LoadedClip] = RecentlyUsed(capacity)
        self._saes: RecentlyUsed[TopKSAE] = RecentlyUsed(capacity)
        self._classifiers: RecentlyUsed[torch.Tensor] = RecentlyUsed(classifiers)

    def close(self) -> None:
        """Let go of every loaded model and classifier (the app's shutdown)."""
        for store in (self._clips, self._saes, self._classifiers):
            store.clear()

    def loaded(self) -> int:
        """How many models (CLIPs and SAEs) are in memory."""
        return len(self._clips) + len(self._saes)

    def sae(self, sae: Sae) -> TopKSAE:
        """The SAE's module on this analyzer's device (without its CLIP)."""
        with torch.inference_mode(False):  # weights that autograd may use (explanations take one backward pass)
            return self._saes.get((sae.key, sae.updated_at), lambda: load_sae(self.data_dir / "saes" / sae.key / "sae", self.device)[0])

    def _get(self, sae: Sae) -> _Loaded:
        model_cfg = ModelConfig.model_validate(sae.config["model"])
        with torch.inference_mode(False):
            clip = self._clips.get(_weights_of(model_cfg), lambda: load_clip(model_cfg, self.device, cache_dir=self.data_dir / "models"))
        return _Loaded(clip, self.sae(sae), model_cfg)

    def _classifier(self, sae: Sae, loaded: _Loaded, classes: tuple[str, ...]) -> torch.Tensor:
        """``[embed_dim, classes]`` built with the SAE's evaluation templates (as its zero-shot table was),
        or read from the data dir's kept classifiers (``clipscope/clip/classifiers.py``)."""
        _, templates = template_set(sae.config["evaluate"]["templates"])
        make = lambda: kept_classifier(self.data_dir / "models" / "classifiers", loaded.clip.provenance, lambda: loaded.clip.model,  # noqa: E731
                                       loaded.model_cfg.name, classes, templates, self.device)
        return self._classifiers.get((_weights_of(loaded.model_cfg), tuple(templates), classes), make)

    def _entries(self, loaded: _Loaded, batch: torch.Tensor, maps: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:func:`firing_entries` of a preprocessed batch."""
        resid = residual_at(loaded.clip.visual, batch, loaded.model_cfg.layer)
        return firing_entries(loaded.sae, resid[:, token_slice(loaded.model_cfg.tokens)], maps)

    def _occluded(self, loaded: _Loaded, image: torch.Tensor, features: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """``[len(features), patches]``: each of ``features``' activation with each patch greyed out."""
        variants = occlusions(image, tuple(loaded.clip.visual.patch_size))
        out = torch.zeros(len(variants), len(features))
        if not len(features):
            return out.T.contiguous()
        known, column = features.sort()
        for start in range(0, len(variants), chunk):
            img, feat, val, _ = self._entries(loaded, variants[start : start + chunk], maps=False)
            at = torch.searchsorted(known, feat).clamp(max=len(known) - 1)
            ours = known[at] == feat  # features that do not fire on the whole image are not asked about
            out[img[ours] + start, column[at[ours]]] = val[ours]
        return out.T.contiguous()

    @torch.inference_mode()
    def text_embedding(self, sae: Sae, text: str, templates: list[str]) -> torch.Tensor:
        """``[D]`` unit-norm embedding of ``text`` by the SAE's CLIP, averaged over ``templates`` (as the
        precompute encoded its vocabulary)."""
        loaded = self._get(sae)
        return build_classifier(loaded.clip.model, loaded.model_cfg.name, [text], templates, self.device)[:, 0].float().cpu()

    @torch.inference_mode()
    def firing(self, sae: Sae, inputs: np.ndarray) -> Firing:
        """The features one image fires, with token maps, from the SAE's inputs ``[tokens, d]`` as its
        precompute stored them (a row of the activation cache): the precompute's own numbers."""
        _, feat, val, maps = firing_entries(self.sae(sae), torch.from_numpy(inputs)[None].to(self.device), maps=True)
        return Firing(dict(zip(feat.tolist(), val.tolist())), maps)

    def _explain(self, sae: Sae, loaded: _Loaded, resid: torch.Tensor, code: SparseCode, question: Question) -> Explanation:
        classifier = self._classifier(sae, loaded, question.classes)
        with torch.inference_mode(False):  # one backward pass, from a stream that is not an inference tensor
            code = SparseCode(code.indices.clone(), code.values.clone(), code.d_sae)
            return explain(loaded.clip.model, loaded.sae, resid.clone(), loaded.model_cfg.layer, loaded.model_cfg.tokens,
                           classifier.clone(), list(question.classes), question.target, exact=question.measure, contrast=question.contrast,
                           code=code)

    def _steer(self, sae: Sae, loaded: _Loaded, resid: torch.Tensor, code: SparseCode, question: Question) -> Steering:
        return steer(loaded.clip.model, loaded.sae, resid, loaded.model_cfg.layer, loaded.model_cfg.tokens,
                     self._classifier(sae, loaded, question.classes), list(question.classes), list(question.edits), code)

    @torch.inference_mode()
    def analyse(self, sae: Sae, images: list[Image.Image], occlude: bool = False, question: Question | None = None) -> list[Analysis]:
        """Each image's firing features and model input, in one batch through CLIP and the SAE; with
        ``occlude``, also each feature's activation with each patch greyed out (one more pass per patch);
        with a ``question``, the explanation of its zero-shot prediction and what edits make of it."""
        loaded = self._get(sae)
        batch = loaded.preprocess(images, self.device)
        resid = residual_at(loaded.clip.visual, batch, loaded.model_cfg.layer)
        x = resid[:, token_slice(loaded.model_cfg.tokens)]
        tokens = x.shape[1]
        code = loaded.sae.encode(x.reshape(-1, x.shape[2]).float())  # once: an explanation and edits read it too
        img, feat, val, maps = firing_entries(loaded.sae, x, True, code)
        out = []
        for row, view in enumerate(loaded.preprocess.pixels(batch)):
            mine = img == row
            occluded = self._occluded(loaded, batch[row], feat[mine]) if occlude else None
            one, its_code = resid[row : row + 1], code.rows(row * tokens, (row + 1) * tokens)
            explanation = self._explain(sae, loaded, one, its_code, question) if question and question.explain else None
            steering = self._steer(sae, loaded, one, its_code, question) if question and question.edits else None
            out.append(Analysis(dict(zip(feat[mine].tolist(), val[mine].tolist())), maps[mine] if maps is not None else None,
                                model_view=view, occluded=occluded, explanation=explanation, steering=steering))
        return out
