"""Automatic feature names and a top-image coherence score, both from CLIP's own image-text space.

A feature's top images are embedded by the full CLIP (unit-norm image embeddings), and every
concept of a vocabulary by its text tower (unit-norm, averaged over prompt templates: the zero-shot
classifier's construction). With ``m_f`` the mean embedding of feature f's top images and ``m`` the
mean over every image of the precompute set:

* a concept's **score** is ``(m_f - m) . t_c``: how much more the top images resemble the concept
  than the average image does (cosine units). Subtracting ``m`` keeps what every image of the set
  shares ("food" on Food-101) from naming every feature. A feature's name is its best concept.
* its **coherence** is the mean cosine between two of its top images minus the mean cosine between
  two images of the set: 0 for top images no more alike than random ones, higher for a feature whose
  top images CLIP sees as one thing. It is the measurable semantic-consistency score the study asks
  for in place of eyeballing collages, computed exactly from sums: the mean over the pairs of a set
  of unit vectors with sum ``s`` is ``(|s|^2 - n) / (n (n - 1))``.

Those read a feature from its *input* side (the images it fires on). Its *output* side: what the
feature writes into the image embedding. An atom added to the CLS token's stream reaches the
embedding directly through the later blocks' skip connections, then ``ln_post`` (which centres it,
scales it by its weight and by the image's own ``1/sigma``, the same for every atom) and the
projection, so its direct-path direction is ``(gamma * centre(W_dec[f])) @ proj``. A concept's
**output score** is that unit direction against ``t_c - mean_c t_c``: moving the embedding along
it raises the concept's zero-shot logit by that much relative to the average concept's (the
common part moves every logit alike and changes no probability). It ignores what the later blocks
make of the atom: a first-order, direct-path reading, exact only where the SAE sits after the last block.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from clipscope.errors import ClipScopeError

BUILTIN_VOCABULARY = Path(__file__).with_name("vocabularies") / "visual-concepts.txt"
"""About 530 visual concepts phrased to fit "a photo of {}.": colours, textures, materials, shapes,
scenes, animals, people, dishes and ingredients, objects, vehicles, text and art."""


def directions_file(sae_dir: Path, precompute_key: str) -> Path:
    """Where a precompute keeps its features' directions (``FeatureNames.directions``, fp16), beside the SAE:
    what searching the features for any text needs (the explorer's concept search)."""
    return sae_dir / f"feature_directions-{precompute_key}.npy"


def read_vocabulary(spec: str | Sequence[str]) -> list[str]:
    """The concepts of ``'builtin'``, of a text file (one per line, ``#`` comments), or of a list; each once."""
    if isinstance(spec, str):
        path = BUILTIN_VOCABULARY if spec == "builtin" else Path(spec).expanduser()
        if not path.is_file():
            raise ClipScopeError(f"vocabulary file {path} does not exist (use 'builtin', a text file with one concept per line, or a list)")
        lines = path.read_text(encoding="utf-8").splitlines()
        spec = [line.split("#", 1)[0] for line in lines]
    return unique_concepts(spec)


def unique_concepts(concepts) -> list[str]:
    """Stripped, blank ones dropped, each once (first spelling kept, compared case-insensitively)."""
    out, seen = [], set()
    for concept in concepts:
        text = " ".join(str(concept).split())
        if text and text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out


def mean_pair_cosine(total: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Mean cosine over the pairs of ``n`` unit vectors summing to ``total`` (NaN below two vectors)."""
    n = n.to(total.dtype)
    pairs = n * (n - 1)
    return torch.where(pairs > 0, (total.pow(2).sum(-1) - n) / pairs.clamp(min=1), torch.full_like(n, float("nan")))


@dataclass
class FeatureNames:
    """Per feature: its best concepts (indices into the vocabulary, best first) with their scores, and its coherence."""

    concepts: torch.Tensor  # [d_sae, candidates] long; -1 where a feature has no top image
    scores: torch.Tensor  # [d_sae, candidates]
    coherence: torch.Tensor  # [d_sae]; NaN below two top images
    baseline: float  # mean cosine between two images of the set (what coherence is measured above)
    directions: torch.Tensor  # [d_sae, D] m_f - m: a concept t scores (m_f - m) . t; zero without top images
    output_concepts: torch.Tensor | None = None  # [d_sae, candidates]: the concepts each atom writes toward, best first
    output_scores: torch.Tensor | None = None  # [d_sae, candidates]; None (both) where the model has no direct path to read


@torch.no_grad()
def name_features(top_rows: torch.Tensor, images: torch.Tensor, concepts: torch.Tensor, candidates: int, chunk: int = 4096) -> FeatureNames:
    """Score every concept for every feature (see the module's docstring).

    ``top_rows`` is ``[d_sae, k]`` rows of ``images`` (-1 = empty slot), ``images`` ``[n, D]`` unit-norm
    embeddings of the whole image set, ``concepts`` ``[D, V]`` unit-norm concept embeddings. Works in
    chunks of features, so memory stays at ``chunk x V`` scores.
    """
    images, concepts = images.float(), concepts.float().to(images.device)
    top_rows = top_rows.to(images.device)
    d_sae, candidates = top_rows.shape[0], min(candidates, concepts.shape[1])
    mean_all = images.mean(0)
    n_all = torch.tensor(float(images.shape[0]), device=images.device)
    baseline = float(mean_pair_cosine(images.sum(0), n_all))
    out_idx = torch.full((d_sae, candidates), -1, dtype=torch.long)
    out_score = torch.full((d_sae, candidates), float("nan"))
    coherence = torch.full((d_sae,), float("nan"))
    directions = torch.zeros(d_sae, images.shape[1])
    for lo in range(0, d_sae, chunk):
        rows = top_rows[lo : lo + chunk]
        valid = rows >= 0
        n = valid.sum(1)
        total = (images[rows.clamp(min=0)] * valid[..., None]).sum(1)  # [chunk, D]
        coherence[lo : lo + len(rows)] = (mean_pair_cosine(total, n) - baseline).cpu()
        has = n > 0
        if not has.any():
            continue
        direction = total[has] / n[has, None] - mean_all
        score, idx = (direction @ concepts).topk(candidates, dim=1)
        where = torch.arange(lo, lo + len(rows))[has.cpu()]
        out_idx[where], out_score[where], directions[where] = idx.cpu(), score.cpu(), direction.cpu()
    return FeatureNames(out_idx, out_score, coherence, baseline, directions)


def output_directions(atoms: torch.Tensor, visual: torch.nn.Module) -> torch.Tensor | None:
    """``[d_sae, D]``: each atom's direct path to the image embedding (module docstring), or None for a
    tower that pools otherwise than by ``ln_post`` on the CLS token (attention pooling, averages) or
    atoms of another width than its stream (SAEs over synthetic vectors in tests)."""
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok" or visual.proj is None:
        return None
    ln = visual.ln_post
    if atoms.shape[1] != ln.weight.shape[0]:
        return None
    centred = atoms.float() - atoms.float().mean(dim=1, keepdim=True)
    return (centred * ln.weight.float().to(atoms.device)) @ visual.proj.float().to(atoms.device)


@torch.no_grad()
def output_names(directions: torch.Tensor, concepts: torch.Tensor, candidates: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """``(concepts, scores)`` ``[d_sae, candidates]``: the best concepts of each unit direction against
    ``concepts`` ``[D, V]`` beyond their mean (module docstring); features by ``chunk``."""
    concepts = concepts.float().to(directions.device)
    beyond = concepts - concepts.mean(dim=1, keepdim=True)
    candidates = min(candidates, concepts.shape[1])
    idx, score = [], []
    for lo in range(0, directions.shape[0], chunk):
        unit = torch.nn.functional.normalize(directions[lo : lo + chunk].float(), dim=1)
        s, i = (unit @ beyond).topk(candidates, dim=1)
        idx.append(i.cpu())
        score.append(s.cpu())
    return torch.cat(idx), torch.cat(score)
