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
from clipscope.db.bulk import analyze, gc_paused, insert_columns
from clipscope.db.images import upsert_images
from clipscope.db.models import Feature, FeatureExample, Image, Sae, SaeStatus
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


def write(
    ctx: Context, sae_id: int, key: str, tb: FeatureTables, cache: ActivationCache, dataset, pc: PrecomputeConfig, started: float,
    directions: Path,
) -> PrecomputeResult:
    """Thumbnails and the features' directions first (idempotent files), then one transaction: images,
    features, examples, status; then the directions of earlier precomputes are removed."""
    d_sae = tb.stats.count.shape[0]
    rows = torch.cat([tb.top.payload.flatten(), tb.samples.payload.flatten()]).unique()
    used_rows = rows[rows >= 0].tolist()
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
    with gc_paused():  # millions of rows' dicts and lists alive at once
        top_classes = tb.classes.top(pc.top_classes, dataset.classes, tb.stats.count) if tb.classes is not None else [None] * d_sae
        features = {"sae_id": [sae_id] * d_sae, **_feature_columns(tb, pc, top_classes, _names_of(tb, d_sae))}
        if tb.names is not None:
            directions.parent.mkdir(parents=True, exist_ok=True)
            tmp = directions.with_suffix(".tmp.npy")
            np.save(tmp, tb.names.directions.to(torch.float16).numpy())
            tmp.replace(directions)
        with session_scope(ctx.database_url) as s, bulk_writes(s):
            image_ids, _ = upsert_images(s, list(thumbs.values()))
            row_to_id = np.zeros(tb.n_images, dtype=np.int64)
            row_to_id[list(thumbs)] = [image_ids[(info["dataset_key"], info["index"])] for info in thumbs.values()]
            s.execute(delete(FeatureExample).where(FeatureExample.sae_id == sae_id))
            s.execute(delete(Feature).where(Feature.sae_id == sae_id))
            insert_columns(s, Feature.__table__, features)  # not the ORM's bulk path: it costs ~6 us a row more
            analyze(s, Feature.__table__, Image.__table__)  # what the examples' foreign keys are checked against
            n_examples = insert_columns(s, FeatureExample.__table__, _example_columns(sae_id, tb, row_to_id, pc.intervals))
            analyze(s, FeatureExample.__table__)  # what the pages read first
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


def _feature_columns(tb: FeatureTables, pc: PrecomputeConfig, top_classes: list, names: dict[str, list]) -> dict[str, list]:
    """The features' rows as columns, with the arithmetic done on arrays: the same float64 operations in
    the same order as Python's on each value, so the same values (a row at a time, this took ~5 s of the
    seed recipe's write)."""
    count, n = tb.stats.count.numpy(), tb.n_images
    maxima = tb.stats.max.double().numpy()
    fired, drawn = count > 0, (maxima > 0).tolist()  # a feature that never fires has no histogram or intervals
    steps = np.array([pc.histogram_range ** (i / pc.histogram_bins) for i in range(pc.histogram_bins + 1)])
    edges = ((maxima / pc.histogram_range)[:, None] * steps).tolist()
    n_int = pc.intervals
    width = (maxima / max(n_int, 1))[:, None]
    lo, hi = (np.arange(n_int) * width).tolist(), (np.arange(1, n_int + 1) * width).tolist()
    in_interval = tb.interval_counts.numpy()[:, :n_int]
    shares = np.divide(in_interval, count[:, None], out=np.zeros(in_interval.shape), where=fired[:, None]).tolist()
    below = tb.hist_below.tolist()
    auto = names["auto_name"]
    return {
        "idx": list(range(len(count))), "n_active": count.tolist(), "frequency": (count / n).tolist(),
        "mean_active": np.divide(tb.stats.total.numpy(), count, out=np.zeros(len(count)), where=fired).tolist(),
        "max_activation": maxima.tolist(), "is_dead": (count == 0).tolist(), "is_dense": (count / n > pc.dense_threshold).tolist(),
        "histogram": [{"edges": e, "counts": h, "below": b} if d else {"edges": [], "counts": [], "below": b}
                      for e, h, b, d in zip(edges, tb.hist_counts.tolist(), below, drawn)],
        "intervals": [[{"lo": a, "hi": b, "count": c, "share": r} for a, b, c, r in zip(*f)] if d else []
                      for *f, d in zip(lo, hi, in_interval.tolist(), shares, drawn)],
        "neighbours": [[[i, c, auto[i]] for i, c in zip(idx, cos)] for idx, cos in zip(tb.neighbour_idx.tolist(), _rounded(tb.neighbour_cos))],
        "classes": top_classes,
        "top_class": [c[0]["name"] if c else None for c in top_classes],
        "top_class_share": [c[0]["share"] if c else None for c in top_classes],
        **names,
    }


def _names_of(tb: FeatureTables, d_sae: int) -> dict[str, list]:
    """The features' naming columns: each one's best concept (when its score is positive), that score, the candidates, its coherence."""
    if tb.names is None:
        return {c: [None] * d_sae for c in ("auto_name", "auto_score", "auto_names", "coherence", "output_names")}
    concepts = tb.concepts

    def ranked(idx: torch.Tensor, scores: torch.Tensor) -> list[list[dict]]:
        return [[{"name": concepts[c], "score": s} for c, s in zip(i, r) if c >= 0] for i, r in zip(idx.tolist(), _rounded(scores))]

    found = ranked(tb.names.concepts, tb.names.scores)
    best = [f[0]["score"] if f else None for f in found]
    out_names = ranked(tb.names.output_concepts, tb.names.output_scores) if tb.names.output_concepts is not None else [None] * d_sae
    return {
        # a best concept the top images match no better than the average image names nothing
        "auto_name": [f[0]["name"] if s is not None and s > 0 else None for f, s in zip(found, best)], "auto_score": best,
        "auto_names": [f or None for f in found],
        "coherence": [None if math.isnan(c) else c for c in tb.names.coherence.tolist()],
        "output_names": out_names,
    }


def _rounded(values: torch.Tensor) -> list:
    """``round(v, 6)`` of every float32 value, as (nested) lists, ~100x faster than calling ``round``: a float32's
    24-bit significand times 10^6 (14 bits and a power of two) is exact in float64, ``torch.round`` rounds
    half to even as ``round`` does, and the division gives the float nearest the decimal, as ``round`` does."""
    if values.dtype != torch.float32:
        raise TypeError(f"exact only for float32 values, not {values.dtype}")
    return (torch.round(values.double() * 1e6) / 1e6).tolist()


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


def _example_columns(sae_id: int, tb: FeatureTables, row_to_id: np.ndarray, n_int: int) -> dict[str, list]:
    """Every feature's top examples (bucket -1), then its interval samples (bucket ``b``), in feature order; ranks
    count the filled slots, a bucket's samples ranked by activation (ties: the later image row first)."""
    top_p, top_v = tb.top.payload.numpy(), tb.top.values.numpy()
    filled = top_p >= 0
    d_sae = len(top_p)
    columns = {
        "feature": [np.broadcast_to(np.arange(d_sae)[:, None], top_p.shape)[filled]], "bucket": [np.full(int(filled.sum()), -1)],
        "rank": [_ranks(filled)], "image_id": [row_to_id[top_p[filled]]], "activation": [top_v[filled]],
    }
    maps = [m.tobytes() for m in tb.top.extra.numpy()[filled]] if tb.top.extra is not None else [None] * len(columns["bucket"][0])
    if n_int:
        s_p, s_v = tb.samples.payload.numpy(), tb.samples.values.numpy()  # [d_sae * n_int, per_interval], a row per (feature, bucket)
        order = np.lexsort((-s_p, -s_v, s_p < 0), axis=1)  # filled first, by activation then row, both descending
        s_p, s_v = np.take_along_axis(s_p, order, 1), np.take_along_axis(s_v, order, 1)
        filled = s_p >= 0
        group = np.broadcast_to(np.arange(len(s_p))[:, None], s_p.shape)[filled]
        for name, values in (("feature", group // n_int), ("bucket", group % n_int), ("rank", _ranks(filled)),
                             ("image_id", row_to_id[s_p[filled]]), ("activation", s_v[filled])):
            columns[name].append(values)
        maps += [None] * int(filled.sum())
    return {"sae_id": [sae_id] * len(maps), **{name: np.concatenate(parts).tolist() for name, parts in columns.items()}, "token_map": maps}


def _ranks(filled: np.ndarray) -> np.ndarray:
    """Each filled slot's place among its row's filled slots, row after row."""
    return (np.cumsum(filled, axis=1) - 1)[filled]
