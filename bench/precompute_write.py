"""The precompute's database write, what a user waits for once a GPU has done the computation in
seconds: ClipScope's ``worker/precompute/stage.py:write`` against the straightforward write of the same
rows, read one feature and one value at a time (``worker/precompute/rows_reference.py``) and inserted
through SQLAlchemy's executemany. Both sides write into a fresh migrated database, alternately, with the
thumbnails stubbed out (their time is the image set's, not the database's); the tables they write are
computed once by ``compute`` from synthetic activations, with synthetic automatic names, and kept in
``--workdir``. On SQLite both databases are then compared row by row (values and storage types).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scratch import scratch_dir  # noqa: E402

CONCEPTS = 600


def tables(workdir: Path, n_images: int, d_sae: int, k: int, pc):
    """The computed tables of a tied random SAE over ``n_images`` synthetic activations (saved in ``workdir``), and their cache."""
    from precompute import make_cache, make_sae

    from clipscope.naming import FeatureNames
    from worker.precompute.stage import compute

    cache = make_cache(workdir, n_images, 768)
    path = workdir / f"write-tables-{n_images}x{d_sae}-k{k}.pt"
    if not path.exists():
        tb = compute(make_sae(768, d_sae, k, "cpu"), cache, pc, workdir / "spill", "cpu")
        g = torch.Generator().manual_seed(0)
        tb.names = FeatureNames(  # what naming gives the seed recipe: eight candidates a feature, read and written
            torch.randint(0, CONCEPTS, (d_sae, 8), generator=g), torch.rand(d_sae, 8, generator=g) - 0.2, torch.rand(d_sae, generator=g), 0.1,
            torch.zeros(d_sae, 16), torch.randint(0, CONCEPTS, (d_sae, 8), generator=g), torch.rand(d_sae, 8, generator=g))
        tb.concepts, tb.templates = [f"concept {i}" for i in range(CONCEPTS)], ["a photo of {}."]
        torch.save(tb, path)
    return torch.load(path, weights_only=False), cache


def fresh(url: str | None, folder: Path, name: str, d_sae: int, k: int) -> tuple[str, int]:
    """A migrated database holding one trained SAE row (PostgreSQL: ``url``'s tables emptied and analysed), and that row's id."""
    from sqlalchemy import text

    from clipscope.db import migrate
    from clipscope.db.models import Sae, SaeStatus
    from clipscope.db.session import session_scope

    url = url or f"sqlite:///{folder / f'{name}.db'}"
    migrate.upgrade(url)
    with session_scope(url) as s:
        if url.startswith("postgresql"):  # analysed empty: statistics an earlier run (or an analysis while it ran) left change no plan
            s.execute(text("TRUNCATE saes, images RESTART IDENTITY CASCADE"))
            s.execute(text("ANALYZE saes, images, features, feature_examples"))
        row = Sae(key="bench", name="bench", status=SaeStatus.TRAINED, model="ViT-B-32", pretrained="none", random_weights=True, layer=10,
                  tokens="cls", d_in=768, d_sae=d_sae, k=k, recipe="topk", config={}, provenance={}, metrics={})
        s.add(row)
        s.flush()
        return url, row.id


def stub_thumbnails(root, dataset, rows, size, threads=None):
    return [(f"{r:064x}", f"thumbnails/{r}.webp", 224, 224) for r in rows]


def reference_write(url: str, sae_id: int, tb, cache, dataset, pc) -> None:
    """The same rows, one dict at a time, through SQLAlchemy's executemany (the images as ClipScope writes them)."""
    import numpy as np
    from sqlalchemy import insert

    from clipscope.db.images import upsert_images
    from clipscope.db.models import Feature, FeatureExample
    from clipscope.db.session import session_scope
    from worker.precompute.rows_reference import example_rows, feature_rows

    payload = torch.cat([tb.top.payload.flatten(), tb.samples.payload.flatten()])
    used = sorted({int(r) for r in payload.tolist() if r >= 0})
    labels, indices = cache.labels(), cache.indices()
    images = [{"dataset": "bench", "split": "train", "dataset_key": dataset.image_key(), "index": int(indices[r]), "label": int(labels[r]),
               "class_name": dataset.classes[int(labels[r])], "content_hash": h, "width": w, "height": ht, "thumbnail": rel}
              for r, (h, rel, w, ht) in zip(used, stub_thumbnails(None, dataset, used, 0))]
    top_classes = tb.classes.top(pc.top_classes, dataset.classes, tb.stats.count)
    features = feature_rows(sae_id, tb, pc, top_classes)
    with session_scope(url) as s:
        ids, _ = upsert_images(s, images)
        row_to_id = np.zeros(tb.n_images, dtype=np.int64)
        row_to_id[used] = [ids[(i["dataset_key"], i["index"])] for i in images]
        s.execute(insert(Feature), features)
        s.execute(insert(FeatureExample), example_rows(sae_id, tb, row_to_id, pc.intervals))


def sqlite_digest(url: str) -> str:
    """Every row of the three tables written, values and SQLite storage types, in rowid order."""
    db, h = sqlite3.connect(url.split("///", 1)[1]), hashlib.sha256()
    for table in ("features", "feature_examples", "images"):
        columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
        listed = ", ".join(f'quote("{c}"), typeof("{c}")' for c in columns)
        for row in db.execute(f"SELECT {listed} FROM {table} ORDER BY rowid"):
            h.update(repr(row).encode())
    db.close()
    return h.hexdigest()


def main() -> None:
    from clipscope.config import PrecomputeConfig
    from clipscope.settings import Settings
    from worker.context import Context
    from worker.precompute import stage

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5_000, help="the seed recipe's precompute set; Food-101's is 75,750")
    parser.add_argument("--d-sae", type=int, default=49_152)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--postgresql", metavar="URL", help="an empty PostgreSQL database to write into instead of SQLite files (emptied between runs)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "clipscope-bench")
    a = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 16))
    pc = PrecomputeConfig(names={"enabled": False})
    tb, cache = tables(a.workdir, a.images, a.d_sae, a.k, pc)
    dataset = types.SimpleNamespace(spec=types.SimpleNamespace(name="bench", split="train"), image_key=lambda: f"bench-{a.images}",
                                    classes=[f"class {i}" for i in range(101)], identity=lambda: {"dataset": "bench"})
    stage.thumbnails = stub_thumbnails
    scratch = scratch_dir("clipscope-bench-write-")
    seconds: dict[str, list[float]] = {"reference": [], "clipscope": []}
    digests: dict[str, str] = {}
    for rnd in range(a.rounds):
        for side in seconds:
            url, sae_id = fresh(a.postgresql, scratch, f"{side}-{rnd}", a.d_sae, a.k)
            started = time.perf_counter()
            if side == "reference":
                reference_write(url, sae_id, tb, cache, dataset, pc)
            else:
                ctx = Context(Settings(data_dir=scratch, database_url=url))
                stage.write(ctx, sae_id, "bench", tb, cache, dataset, pc, started, scratch / "directions.npy")
            seconds[side].append(time.perf_counter() - started)
            if not a.postgresql:
                digests[side] = sqlite_digest(url)
                Path(url.split("///", 1)[1]).unlink()
    ref, ours = statistics.median(seconds["reference"]), statistics.median(seconds["clipscope"])
    print(json.dumps({
        "shape": f"{a.images} images x {a.d_sae} features, k={a.k}: {int(tb.stats.count.gt(0).sum())} features fire",
        "database": "postgresql" if a.postgresql else "sqlite", "reference_seconds": seconds["reference"], "clipscope_seconds": seconds["clipscope"],
        "speedup": ref / ours, **({"same_rows": digests["reference"] == digests["clipscope"]} if digests else {}),
    }, indent=2))


if __name__ == "__main__":
    main()
