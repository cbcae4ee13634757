"""Stage 4: stream an image set through the SAE and commit every feature's page data in one transaction.

Pass 1 encodes the activation cache batch by batch, accumulating per-feature counts, sums,
maxima and the top examples, and spills the sparse firing entries to disk. Pass 2 reads the
spilled entries back to build log-spaced histograms (which need each feature's maximum) and the
interval samples. Memory is bounded by the batch and by (features x slots kept).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import delete, select
from tqdm import tqdm

from clipscope.activation_cache import ActivationCache
from clipscope.config import PrecomputeConfig, stable_hash
from clipscope.db.bulk import insert_rows
from clipscope.db.images import upsert_images
from clipscope.db.models import Feature, FeatureExample, Sae, SaeStatus
from clipscope.db.session import bulk_writes, session_scope
from clipscope.naming import FeatureNames, directions_file, read_vocabulary
from clipscope.sae.model import TopKSAE
from clipscope.settings import usable_cores
from clipscope.thumbnails import ensure_thumbnail
from clipscope.token_maps import per_image_entries, quantise
from worker.context import Context
from worker.precompute.accumulate import ClassCounts, FeatureStats, GroupTopK, log_histogram, sample_priority
from worker.precompute.naming import Namer, name_all
from worker.precompute.neighbours import decoder_neighbours

log = logging.getLogger(__name__)


@dataclass
class PrecomputeResult:
    n_images: int
    n_features: int
    n_examples: int
    n_thumbnails: int
    reused: bool
    seconds: float


@dataclass
class FeatureTables:
    """Everything computed, as tensors on the CPU (what ``write`` turns into rows)."""

    n_images: int
    stats: FeatureStats
    top: GroupTopK
    samples: GroupTopK
    hist_counts: torch.Tensor  # [d_sae, bins]
    hist_below: torch.Tensor  # [d_sae]
    interval_counts: torch.Tensor  # [d_sae, intervals]
    neighbour_idx: torch.Tensor
    neighbour_cos: torch.Tensor
    classes: ClassCounts | None = None
    names: FeatureNames | None = None
    concepts: list[str] | None = None  # what ``names.concepts`` indexes
    templates: list[str] | None = None  # what the concepts were encoded with


@torch.no_grad()
def compute(sae: TopKSAE, cache: ActivationCache, pc: PrecomputeConfig, spill_dir: Path, device: str, progress: bool = False) -> FeatureTables:
    """Both passes over ``cache``; deterministic for a given SAE, cache and config."""
    n, t, d_sae = cache.n_images, cache.tokens_per_image, sae.d_sae
    acts = cache.activations()
    stats = FeatureStats(d_sae, device)
    # Over several tokens an image's top examples also keep where in it the feature fired (token maps).
    top = GroupTopK(d_sae, pc.top_k, device, extra=t if t > 1 else 0)
    per_batch = max(1, pc.batch_size // t)
    spill_dir.mkdir(parents=True, exist_ok=True)
    chunks: list[Path] = []
    for start in tqdm(range(0, n, per_batch), desc="precompute", unit="batch", disable=not progress):
        end = min(n, start + per_batch)
        x = torch.from_numpy(np.asarray(acts[start:end], dtype=np.float32).reshape(-1, cache.d)).to(device)
        code = sae.encode(x)
        rows = torch.arange(start, end, device=device)
        if t > 1:  # token maps only for the entries that enter a top k: once it fills, a few thousand a batch
            img, feat, val, tokens = per_image_entries(code.indices, code.values, rows, t, d_sae, maps=True)
            enter = top.entering(feat, val)
            top.update(feat[enter], val[enter], img[enter], val[enter], quantise(tokens.maps(enter), val[enter]))
        else:
            img, feat, val = per_image_entries(code.indices, code.values, rows, t, d_sae)
            top.update(feat, val, img, val)
        stats.update(feat, val)
        path = spill_dir / f"entries_{len(chunks):06d}.npz"
        np.savez(path, img=img.cpu().numpy().astype(np.int32), feat=feat.cpu().numpy().astype(np.int32), val=val.float().cpu().numpy())
        chunks.append(path)

    bins, n_int = pc.histogram_bins, pc.intervals
    hist = torch.zeros(d_sae * bins, dtype=torch.long, device=device)
    below = torch.zeros(d_sae, dtype=torch.long, device=device)
    int_counts = torch.zeros(d_sae * max(n_int, 1), dtype=torch.long, device=device)
    samples = GroupTopK(d_sae * max(n_int, 1), pc.per_interval, device)
    classes = ClassCounts.for_labels(torch.from_numpy(np.array(cache.labels())), d_sae, device) if pc.top_classes else None
    for path in chunks:
        with np.load(path) as z:
            img = torch.from_numpy(z["img"].astype(np.int64)).to(device)
            feat = torch.from_numpy(z["feat"].astype(np.int64)).to(device)
            val = torch.from_numpy(z["val"]).to(device)
        if classes is not None:
            classes.update(img, feat, val)
        b = log_histogram(feat, val, stats.max, bins, pc.histogram_range)
        below.index_add_(0, feat[b < 0], torch.ones_like(feat[b < 0]))
        hist.index_add_(0, (feat * bins + b)[b >= 0], torch.ones_like(feat[b >= 0]))
        if n_int:
            width = stats.max[feat] / n_int
            ib = (torch.ceil(val / width).long() - 1).clamp(0, n_int - 1)
            group = feat * n_int + ib
            int_counts.index_add_(0, group, torch.ones_like(group))
            not_top = ~top.holds(feat, val, img)  # the interval samples leave out the top images
            prio = torch.from_numpy(sample_priority(img.cpu().numpy(), feat.cpu().numpy(), pc.seed)).to(device)
            samples.update(group[not_top], prio[not_top], img[not_top], val[not_top])
    shutil.rmtree(spill_dir, ignore_errors=True)
    nb_idx, nb_cos = decoder_neighbours(sae.W_dec, pc.neighbours) if pc.neighbours else (torch.empty(d_sae, 0), torch.empty(d_sae, 0))
    cpu = lambda x: x.cpu()  # noqa: E731
    for acc in (a for a in (stats, top, samples, classes) if a is not None):
        for name, value in vars(acc).items():
            if isinstance(value, torch.Tensor):
                setattr(acc, name, cpu(value))
    return FeatureTables(
        n, stats, top, samples, cpu(hist.view(d_sae, bins)), cpu(below), cpu(int_counts.view(d_sae, -1)), cpu(nb_idx), cpu(nb_cos), classes
    )


PRECOMPUTE_FORMAT = 4
"""What the precompute writes; raised whenever it writes something new (2: token maps, classes, leading
class; 3: automatic names and coherence), so a finished precompute of an older format is redone instead of reused."""


def precompute_key(sae_key: str, cache: ActivationCache, pc: PrecomputeConfig) -> str:
    """Changes with anything that changes what is written, the vocabulary file's contents included."""
    config = pc.model_dump(mode="json", exclude={"overlaps"})  # measured after, into another table
    if pc.names.enabled:
        config["names"]["concepts"] = stable_hash(read_vocabulary(pc.names.vocabulary))
    else:
        config["names"] = {"enabled": False}  # the other naming knobs change nothing then
    return stable_hash({"sae": sae_key, "cache": cache.path.name, "config": config, "format": PRECOMPUTE_FORMAT})


def precompute(
    ctx: Context, sae_key: str, sae: TopKSAE, cache: ActivationCache, dataset, pc: PrecomputeConfig, force: bool = False,
    namer: Namer | None = None,
) -> PrecomputeResult:
    """Compute and commit; a finished precompute with the same key is reused unless ``force``.

    ``namer`` gives CLIP for the automatic names (``pc.names``), required when they are enabled.
    """
    if pc.names.enabled and namer is None:
        raise ValueError("precompute.names is enabled but no CLIP was given to embed the images (or set precompute.names.enabled = false)")
    url, started = ctx.database_url, time.perf_counter()
    key = precompute_key(sae_key, cache, pc)
    with session_scope(url) as s:
        row = s.scalar(select(Sae).where(Sae.key == sae_key))
        if row is None or row.status not in (SaeStatus.TRAINED, SaeStatus.READY):
            raise ValueError(f"SAE {sae_key} is not trained yet")
        if not force and row.status == SaeStatus.READY and (row.precompute or {}).get("key") == key:
            p = row.precompute
            if "classes" not in p:  # kept since attribution; a precompute from before gets them on its next run
                row.precompute = {**p, "classes": list(dataset.classes)}
            return PrecomputeResult(p["n_images"], p["n_features"], p["n_examples"], p["n_thumbnails"], True, 0.0)
        sae_id = row.id
    tables = compute(sae.to(ctx.device).eval(), cache, pc, ctx.layout.root / "tmp" / f"precompute-{key}", ctx.device, ctx.settings.progress)
    if pc.names.enabled:
        tables.names, tables.concepts = name_all(ctx, namer, cache, dataset, tables.top.payload, pc.names, atoms=sae.W_dec.detach())
        tables.templates = list(pc.names.templates)
    return write(ctx, sae_id, key, tables, cache, dataset, pc, started, directions_file(ctx.layout.saes / sae_key, key))


def thumbnails(data_dir: Path, dataset, rows: list[int], size: int, threads: int | None = None) -> list[tuple[str, str, int, int]]:
    """``(content hash, thumbnail path, width, height)`` of each of ``rows``' images, in order, each thumbnail
    written if missing. Reading, resizing and WebP-encoding an image release the GIL, so ``threads`` (by
    default one per usable core, at most 16) do it side by side: 7.7 -> 3.9 ms an image on 2 cores. By
    estimate, the study's 5,000 images on one core would take ~40 s, most of the stage on a GPU machine.
    An image that fails stops the rest at once: ``Executor.map`` cancels those still queued."""

    def one(row: int) -> tuple[str, str, int, int]:
        image, _ = dataset[row]
        digest, rel = ensure_thumbnail(data_dir, image, size)
        return digest, rel, image.width, image.height

    with ThreadPoolExecutor(threads or min(16, usable_cores())) as pool:
        return list(pool.map(one, rows))


def _interval_bounds(maximum: float, n_int: int) -> list[tuple[float, float]]:
    width = maximum / n_int if n_int else 0.0
    return [(i * width, (i + 1) * width) for i in range(n_int)]


def write(
    ctx: Context, sae_id: int, key: str, tb: FeatureTables, cache: ActivationCache, dataset, pc: PrecomputeConfig, started: float,
    directions: Path,
) -> PrecomputeResult:
    """Thumbnails and the features' directions first (idempotent files), then one transaction: images,
    features, examples, status; then the directions of earlier precomputes are removed."""
    d_sae = tb.stats.count.shape[0]
    n_int = pc.intervals
    used_rows = sorted({int(r) for r in torch.cat([tb.top.payload.flatten(), tb.samples.payload.flatten()]).tolist() if r >= 0})
    base_key = dataset.image_key()
    dataset_indices = cache.indices()
    labels = cache.labels()
    thumbs: dict[int, dict] = {}
    for row, (digest, rel, width, height) in zip(used_rows, thumbnails(ctx.layout.root, dataset, used_rows, pc.thumbnail_size)):
        label = int(labels[row])
        thumbs[row] = {
            "dataset": dataset.spec.name, "split": dataset.spec.split, "dataset_key": base_key, "index": int(dataset_indices[row]),
            "label": label, "class_name": dataset.classes[label] if 0 <= label < len(dataset.classes) else None,
            "content_hash": digest, "width": width, "height": height, "thumbnail": rel,
        }
    count, total, maxima = tb.stats.count.tolist(), tb.stats.total.tolist(), tb.stats.max.tolist()
    hist, below, icounts = tb.hist_counts.tolist(), tb.hist_below.tolist(), tb.interval_counts.tolist()
    nb_idx, nb_cos = tb.neighbour_idx.tolist(), tb.neighbour_cos.tolist()
    top_classes = tb.classes.top(pc.top_classes, dataset.classes, tb.stats.count) if tb.classes is not None else [None] * d_sae
    named = _names_of(tb, d_sae)
    if tb.names is not None:
        directions.parent.mkdir(parents=True, exist_ok=True)
        tmp = directions.with_suffix(".tmp.npy")
        np.save(tmp, tb.names.directions.to(torch.float16).numpy())
        tmp.replace(directions)
    ratio = pc.histogram_range
    features = []
    for f in range(d_sae):
        m = maxima[f]
        edges = [float(m / ratio * ratio ** (i / pc.histogram_bins)) for i in range(pc.histogram_bins + 1)] if m > 0 else []
        shares = [c / count[f] if count[f] else 0.0 for c in icounts[f][:n_int]]
        features.append({
            "sae_id": sae_id, "idx": f, "n_active": count[f], "frequency": count[f] / tb.n_images,
            "mean_active": total[f] / count[f] if count[f] else 0.0, "max_activation": m,
            "is_dead": count[f] == 0, "is_dense": count[f] / tb.n_images > pc.dense_threshold,
            "histogram": {"edges": edges, "counts": hist[f] if m > 0 else [], "below": below[f]},
            "intervals": [{"lo": lo, "hi": hi, "count": icounts[f][i], "share": shares[i]} for i, (lo, hi) in enumerate(_interval_bounds(m, n_int))] if m > 0 else [],
            "neighbours": [[n, round(c, 6), named[n]["auto_name"]] for n, c in zip(nb_idx[f], nb_cos[f])],
            "classes": top_classes[f],
            "top_class": top_classes[f][0]["name"] if top_classes[f] else None,
            "top_class_share": top_classes[f][0]["share"] if top_classes[f] else None,
            **named[f],
        })
    with session_scope(ctx.database_url) as s, bulk_writes(s):
        image_ids, _ = upsert_images(s, list(thumbs.values()))
        row_to_id = {row: image_ids[(info["dataset_key"], info["index"])] for row, info in thumbs.items()}
        s.execute(delete(FeatureExample).where(FeatureExample.sae_id == sae_id))
        s.execute(delete(Feature).where(Feature.sae_id == sae_id))
        insert_rows(s, Feature.__table__, features)  # not the ORM's bulk path: it costs ~6 us a row more
        n_examples = insert_rows(s, FeatureExample.__table__, _example_rows(sae_id, tb, row_to_id, n_int, pc.per_interval))
        sae = s.get(Sae, sae_id)
        seconds = time.perf_counter() - started
        sae.precompute = {
            "key": key, "cache": cache.path.name, "dataset": dataset.identity(), "images": base_key, "n_images": tb.n_images,
            "n_features": d_sae, "n_examples": n_examples, "n_thumbnails": len(thumbs), "seconds": seconds,
            "names": _names_summary(tb, directions.name), "classes": list(dataset.classes),
        }
        sae.status = SaeStatus.READY
    for old in directions.parent.glob("feature_directions-*.npy"):  # the committed precompute's file is the one kept
        if old != directions:
            old.unlink(missing_ok=True)
    return PrecomputeResult(tb.n_images, d_sae, n_examples, len(thumbs), False, seconds)


def _names_of(tb: FeatureTables, d_sae: int) -> list[dict]:
    """Each feature's naming columns: its best concept (when its score is positive), that score, the candidates, its coherence."""
    empty = {"auto_name": None, "auto_score": None, "auto_names": None, "coherence": None, "output_names": None}
    if tb.names is None:
        return [empty] * d_sae
    idx, scores, coherence = tb.names.concepts.tolist(), tb.names.scores.tolist(), tb.names.coherence.tolist()
    has_out = tb.names.output_concepts is not None
    out_idx, out_scores = (tb.names.output_concepts.tolist(), tb.names.output_scores.tolist()) if has_out else ([], [])
    out = []
    for f in range(d_sae):
        found = [{"name": tb.concepts[c], "score": round(s, 6)} for c, s in zip(idx[f], scores[f]) if c >= 0]
        named = bool(found) and found[0]["score"] > 0  # a best concept the top images match no better than the average image names nothing
        out.append({
            "auto_name": found[0]["name"] if named else None, "auto_score": found[0]["score"] if found else None,
            "auto_names": found or None, "coherence": None if math.isnan(coherence[f]) else coherence[f],
            "output_names": [{"name": tb.concepts[c], "score": round(s, 6)} for c, s in zip(out_idx[f], out_scores[f])] if has_out else None,
        })
    return out


def _names_summary(tb: FeatureTables, directions: str) -> dict | None:
    """For the overview: the vocabulary's size, the coherence baseline, the coherence of an average feature;
    for the concept search: the directions file and the templates a text is encoded with."""
    if tb.names is None:
        return None
    c = tb.names.coherence
    c = c[~c.isnan()]
    return {
        "concepts": len(tb.concepts), "baseline": tb.names.baseline, "mean_coherence": float(c.mean()) if len(c) else None,
        "median_coherence": float(c.median()) if len(c) else None, "directions": directions, "templates": tb.templates,
    }


def _example_rows(sae_id: int, tb: FeatureTables, row_to_id: dict[int, int], n_int: int, per_interval: int):
    top_p, top_v = tb.top.payload.tolist(), tb.top.values.tolist()
    maps = tb.top.extra.numpy() if tb.top.extra is not None else None
    for f, (rows, vals) in enumerate(zip(top_p, top_v)):
        for rank, (r, v) in enumerate((r, v) for r, v in zip(rows, vals) if r >= 0):
            token_map = maps[f, rank].tobytes() if maps is not None else None
            yield {"sae_id": sae_id, "feature": f, "bucket": -1, "rank": rank, "image_id": row_to_id[r], "activation": v, "token_map": token_map}
    if not n_int:
        return
    s_p = tb.samples.payload.view(-1, n_int, per_interval).tolist()
    s_v = tb.samples.values.view(-1, n_int, per_interval).tolist()
    for f in range(len(s_p)):
        for b in range(n_int):
            picked = sorted(((v, r) for r, v in zip(s_p[f][b], s_v[f][b]) if r >= 0), reverse=True)
            for rank, (v, r) in enumerate(picked):
                yield {"sae_id": sae_id, "feature": f, "bucket": b, "rank": rank, "image_id": row_to_id[r], "activation": v, "token_map": None}
