import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from clipscope.config import DatasetSpec, PrecomputeConfig, parse_config
from clipscope.db.models import Feature, FeatureExample, Image, Label, LabelRevision, Sae, SaeStatus
from clipscope.db.session import session_scope
from clipscope.sae.io import load_sae
from tests.conftest import autovacuum_off, planner_statistics, array_cache
from clipscope.datasets import build_dataset
from worker.precompute.accumulate import GroupTopK
from worker.precompute.neighbours import decoder_neighbours
from worker.precompute.stage import precompute
from worker.train.loop import train

N, D, D_SAE, K = 240, 16, 40, 6
PC = PrecomputeConfig(top_k=12, intervals=3, per_interval=2, histogram_bins=8, histogram_range=100.0, neighbours=5,
                      thumbnail_size=32, batch_size=50, dense_threshold=0.3, top_classes=3, names={"enabled": False})


def test_group_topk_streamed_in_chunks_equals_a_full_sort():
    rng = np.random.default_rng(0)
    groups = torch.from_numpy(rng.integers(0, 7, 500))
    scores = torch.from_numpy(rng.random(500))
    acc = GroupTopK(7, 4)
    for lo in range(0, 500, 37):
        sl = slice(lo, lo + 37)
        acc.update(groups[sl], scores[sl], torch.arange(500)[sl], scores[sl].float())
    for g in range(7):
        mine = (groups == g).nonzero().flatten()
        best = mine[scores[mine].argsort(descending=True)[:4]]
        assert acc.payload[g].tolist() == best.tolist()



def test_group_topk_breaks_ties_for_the_entry_seen_first():
    """Scores 0..3 only, so nearly every entry ties with one kept: the earlier one must stay, across and within chunks."""
    rng = np.random.default_rng(1)
    groups = torch.from_numpy(rng.integers(0, 5, 400))
    scores = torch.from_numpy(rng.integers(0, 4, 400).astype(np.float64))
    acc = GroupTopK(5, 6)
    for lo in range(0, 400, 11):
        sl = slice(lo, lo + 11)
        acc.update(groups[sl], scores[sl], torch.arange(400)[sl], scores[sl].float())
    for g in range(5):
        mine = [i for i in range(400) if groups[i] == g]
        best = sorted(mine, key=lambda i: (-scores[i], i))[:6]  # highest score, then arrival
        assert acc.payload[g].tolist() == best
        assert acc.scores[g].tolist() == [scores[i].item() for i in best]

def test_group_topk_holds_exactly_the_entries_it_kept():
    """Tied scores (an entry equal to a group's k-th kept score, kept or not) and a group with fewer
    entries than k (every one kept, its k-th score -inf): holds agrees with the kept payloads."""
    rng = np.random.default_rng(3)
    groups = torch.from_numpy(rng.integers(0, 5, 300))
    groups[groups == 4] = 3
    groups[:2] = 4  # two entries, k = 6
    scores = torch.from_numpy(rng.integers(0, 4, 300).astype(np.float64))
    payload = torch.arange(300)
    acc = GroupTopK(5, 6)
    for lo in range(0, 300, 17):
        sl = slice(lo, lo + 17)
        acc.update(groups[sl], scores[sl], payload[sl], scores[sl].float())
    kept = [set(acc.payload[g].tolist()) for g in range(5)]
    expected = [int(p) in kept[int(g)] for g, p in zip(groups, payload)]
    held = acc.holds(groups, scores.float(), payload)
    assert held.tolist() == expected and sum(expected) == 4 * 6 + 2
    assert held[:2].all() and (scores[~held] <= acc.scores[groups[~held], -1]).all()


def test_group_topk_carries_each_entrys_bytes_with_it():
    """The extra bytes (a token map) follow their entry through streamed updates, ties and evictions."""
    rng = np.random.default_rng(2)
    groups = torch.from_numpy(rng.integers(0, 5, 300))
    scores = torch.from_numpy(rng.integers(0, 6, 300).astype(np.float64))
    extra = torch.arange(300)[:, None].mul(torch.tensor([1, 7, 13])).remainder(256).to(torch.uint8)
    acc = GroupTopK(5, 4, extra=3)
    for lo in range(0, 300, 23):
        sl = slice(lo, lo + 23)
        acc.update(groups[sl], scores[sl], torch.arange(300)[sl], scores[sl].float(), extra[sl])
    for g in range(5):
        assert acc.extra[g].tolist() == extra[acc.payload[g]].tolist()
    with pytest.raises(ValueError, match="extra bytes"):
        acc.update(groups[:3], scores[:3], torch.arange(3), scores[:3].float())


@pytest.mark.parametrize(("atoms", "chunk", "tile"), [(30, 7, 64), (30, 7, 5), (30, 3, 2), (30, 64, 8), (200, 64, 64), (200, 64, 24)])
def test_neighbours_equal_brute_force_cosines(atoms, chunk, tile):
    """Blocks of 7 (the last one short), of fewer rows than neighbours asked for, one block, and blocks of
    64 rows, whose later columns take the grouped top-k (rows in 8 groups of 8, 4 of them candidates);
    the later columns in one tile, in tiles narrower than the block or than the neighbours asked for,
    and in tiles that do not divide them (the last one short)."""
    w = torch.randn(atoms, 8, generator=torch.Generator().manual_seed(chunk))
    idx, cos = decoder_neighbours(w, 4, chunk=chunk, tile=tile)
    unit = torch.nn.functional.normalize(w, dim=1)
    sims = unit @ unit.T
    sims.fill_diagonal_(-2)
    torch.testing.assert_close(cos, sims.topk(4, dim=1).values)
    assert idx.tolist() == sims.topk(4, dim=1).indices.tolist()


@pytest.fixture
def trained(db_ctx):
    """A small trained SAE over random activations of N synthetic images, and its dataset."""
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(N, D)) + rng.gamma(1.0, 1.0, size=(N, D))
    labels = rng.integers(-1, 4, N)  # four classes, and some images without one
    cache = array_cache(db_ctx.layout.activations, acts, labels=labels)
    cfg = parse_config({"name": "pc", "sae": {"d_sae": D_SAE, "k": K}, "train": {"epochs": 2, "batch_size": 32, "holdout_fraction": 0.1}})
    result = train(db_ctx, cfg, cache)
    sae, _ = load_sae(result.sae_dir)
    dataset = build_dataset(DatasetSpec(name="synthetic", synthetic_size=N, image_size=48), db_ctx.layout.datasets)
    return db_ctx, result.sae_key, sae, cache, dataset, acts


def _dense_codes(sae, cache):
    """Dense codes of the cached fp16 activations, encoded in the stage's batches (bit-identical values)."""
    x = torch.from_numpy(np.asarray(cache.activations()[:, 0], dtype=np.float32))
    with torch.no_grad():
        return torch.cat([sae.encode(x[i : i + PC.batch_size]).to_dense() for i in range(0, len(x), PC.batch_size)]).numpy()


def _rows(url, sae_key):
    with session_scope(url) as s:
        sae_id = s.scalar(select(Sae.id).where(Sae.key == sae_key))
        feats = s.execute(select(Feature).where(Feature.sae_id == sae_id).order_by(Feature.idx)).scalars().all()
        examples = s.execute(
            select(FeatureExample.feature, FeatureExample.bucket, FeatureExample.rank, Image.index, FeatureExample.activation)
            .join(Image, Image.id == FeatureExample.image_id)
            .where(FeatureExample.sae_id == sae_id)
            .order_by(FeatureExample.feature, FeatureExample.bucket, FeatureExample.rank)
        ).all()
        feat_rows = [(f.idx, f.n_active, f.frequency, f.mean_active, f.max_activation, f.is_dead, f.is_dense, f.histogram, f.intervals, f.neighbours, f.classes, f.top_class, f.top_class_share) for f in feats]
        n_images = s.scalar(select(func.count()).select_from(Image))
        return feat_rows, [tuple(e) for e in examples], n_images


def test_top_examples_and_statistics_equal_brute_force(trained):
    ctx, key, sae, cache, dataset, acts = trained
    result = precompute(ctx, key, sae, cache, dataset, PC)
    assert not result.reused and result.n_features == D_SAE and result.n_images == N
    z = _dense_codes(sae, cache)  # [N, D_SAE]
    feats, examples, _ = _rows(ctx.database_url, key)
    labels = cache.labels()
    for f, n_active, freq, mean_active, maximum, dead, dense, hist, intervals, _, classes, top_class, top_share in feats:
        col = z[:, f]
        fired = col[col > 0]
        assert n_active == len(fired) and freq == pytest.approx(len(fired) / N)
        assert dead == (len(fired) == 0) and dense == (len(fired) / N > PC.dense_threshold)
        fired_labels = labels[col > 0]
        by_class = sorted(((-int((fired_labels == c).sum()), c) for c in range(4) if (fired_labels == c).any()))[: PC.top_classes]
        assert [(e["label"], e["name"], e["count"]) for e in classes] == [(c, dataset.classes[c], -n) for n, c in by_class]
        assert (top_class, top_share) == ((classes[0]["name"], classes[0]["share"]) if classes else (None, None))
        for e in classes:
            assert e["share"] == pytest.approx(e["count"] / len(fired)) and e["of_class"] == pytest.approx(e["count"] / (labels == e["label"]).sum())
            assert e["mean"] == pytest.approx(col[(col > 0) & (labels == e["label"])].astype(np.float64).mean(), rel=1e-6)
        if len(fired) == 0:
            continue
        assert maximum == pytest.approx(fired.max(), rel=1e-6)
        assert mean_active == pytest.approx(fired.astype(np.float64).mean(), rel=1e-6)
        top = [(e[3], e[4]) for e in examples if e[0] == f and e[1] == -1]
        order = np.argsort(-col, kind="stable")[: min(12, len(fired))]
        assert [i for i, _ in top] == dataset.indices[order].tolist()
        np.testing.assert_allclose([a for _, a in top], col[order], rtol=1e-6)
        edges = np.geomspace(fired.max() / 100, fired.max(), 9)
        np.testing.assert_allclose(hist["edges"], edges, rtol=1e-5)
        expected_counts, _ = np.histogram(fired.astype(np.float64)[fired >= edges[0]], bins=edges)
        assert hist["counts"] == expected_counts.tolist() and hist["below"] == int((fired < edges[0]).sum())
        bounds = np.linspace(0, fired.max(), 4)
        in_interval = np.clip(np.ceil(fired / (fired.max() / 3)) - 1, 0, 2)
        assert [iv["count"] for iv in intervals] == [int((in_interval == b).sum()) for b in range(3)]
        assert sum(iv["share"] for iv in intervals) == pytest.approx(1.0)
        np.testing.assert_allclose([iv["hi"] for iv in intervals], bounds[1:], rtol=1e-5)
        top_images = {i for i, _ in top}
        for e in (e for e in examples if e[0] == f and e[1] >= 0):
            lo, hi = intervals[e[1]]["lo"], intervals[e[1]]["hi"]
            assert lo < e[4] <= hi * (1 + 1e-6) and e[3] not in top_images


def test_a_second_run_changes_nothing_and_labels_survive(trained):
    ctx, key, sae, cache, dataset, _ = trained
    url = ctx.database_url
    precompute(ctx, key, sae, cache, dataset, PC)
    before = _rows(url, key)
    with session_scope(url) as s:
        sae_id = s.scalar(select(Sae.id).where(Sae.key == key))
        s.add(Label(sae_id=sae_id, feature=3, revision=1, text="red things", category="semantic", author="ann"))
        s.add(LabelRevision(sae_id=sae_id, feature=3, revision=1, text="red things", category="semantic", author="ann"))
    assert precompute(ctx, key, sae, cache, dataset, PC).reused
    forced = precompute(ctx, key, sae, cache, dataset, PC, force=True)
    assert not forced.reused
    assert _rows(url, key) == before  # same rows, no duplicates (images included)
    with session_scope(url) as s:
        assert [(lab.text, lab.revision) for lab in s.scalars(select(Label))] == [("red things", 1)]
        assert s.scalar(select(func.count()).select_from(LabelRevision)) == 1


def test_a_precompute_of_an_older_format_is_redone_not_reused(trained, monkeypatch):
    """A database precomputed before the precompute wrote its newer columns gets them on the next run."""
    import worker.precompute.stage as stage

    ctx, key, sae, cache, dataset, _ = trained
    with monkeypatch.context() as m:
        m.setattr(stage, "PRECOMPUTE_FORMAT", stage.PRECOMPUTE_FORMAT - 1)
        precompute(ctx, key, sae, cache, dataset, PC)
        assert precompute(ctx, key, sae, cache, dataset, PC).reused
    assert not precompute(ctx, key, sae, cache, dataset, PC).reused


def test_the_sae_is_ready_only_once_the_precompute_committed(trained, monkeypatch):
    ctx, key, sae, cache, dataset, _ = trained
    url = ctx.database_url
    import worker.precompute.stage as stage

    real = stage.insert_columns

    def broken(session, table, columns):  # the features go in, then five examples, then the disk fills up
        if table.name != "feature_examples":
            return real(session, table, columns)
        real(session, table, {name: values[:5] for name, values in columns.items()})
        assert session.scalar(select(func.count()).select_from(FeatureExample)) == 5
        raise RuntimeError("disk full")

    monkeypatch.setattr(stage, "insert_columns", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        precompute(ctx, key, sae, cache, dataset, PC)
    with session_scope(url) as s:
        assert s.scalar(select(Sae.status).where(Sae.key == key)) == SaeStatus.TRAINED
        assert s.scalar(select(func.count()).select_from(Feature)) == 0
        assert s.scalar(select(func.count()).select_from(FeatureExample)) == 0
    monkeypatch.setattr(stage, "insert_columns", real)
    precompute(ctx, key, sae, cache, dataset, PC)
    with session_scope(url) as s:
        assert s.scalar(select(Sae.status).where(Sae.key == key)) == SaeStatus.READY


def test_the_write_builds_and_inserts_its_rows_with_the_garbage_collector_paused(trained, monkeypatch):
    """Millions of rows alive at once made the collector walk them over and over (~4 s of a 13 s write); and
    the examples go in after their parents' statistics are fresh."""
    import gc

    import worker.precompute.stage as stage

    ctx, key, sae, cache, dataset, _ = trained
    real, real_analyze, seen = stage.insert_columns, stage.analyze, []

    def watched(session, table, columns):
        seen.append((table.name, gc.isenabled()))
        return real(session, table, columns)

    monkeypatch.setattr(stage, "insert_columns", watched)
    monkeypatch.setattr(stage, "analyze", lambda session, *tables: seen.append(tuple(t.name for t in tables)) or real_analyze(session, *tables))
    precompute(ctx, key, sae, cache, dataset, PC)
    assert gc.isenabled()
    # the examples' parents analysed before the examples' foreign keys are checked, the examples before the pages read them
    # (clipscope/db/bulk.py:analyze)
    assert seen == [("features", False), ("features", "images"), ("feature_examples", False), ("feature_examples",)]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite's planner reads the examples by their key without statistics
def test_on_postgresql_the_pages_find_the_written_examples_analysed(trained):
    """Planner statistics taken before the examples went in (or none) made a list page read its 300 examples
    through the wrong index until autovacuum came round: 78 ms instead of ~3 ms at 49,152 features."""
    ctx, key, sae, cache, dataset, _ = trained
    autovacuum_off(ctx.database_url, "feature_examples")
    result = precompute(ctx, key, sae, cache, dataset, PC)
    assert planner_statistics(ctx.database_url, "feature_examples") == (result.n_examples, True)


def test_thumbnails_are_stored_once_by_content_hash(trained):
    ctx, key, sae, cache, dataset, _ = trained
    result = precompute(ctx, key, sae, cache, dataset, PC)
    files = list((ctx.layout.root / "thumbnails").rglob("*.webp"))
    assert len(files) == result.n_thumbnails
    with session_scope(ctx.database_url) as s:
        hashes = s.scalars(select(Image.content_hash)).all()
    assert len(hashes) == len(set(hashes)) == result.n_thumbnails
    from PIL import Image as PILImage

    with PILImage.open(files[0]) as im:
        assert im.format == "WEBP" and im.size == (32, 32)


def test_thumbnails_written_side_by_side_answer_each_row_with_its_own_image(tmp_path):
    """Threads finish in any order; each row still gets its own image's hash, file and size (a row asked twice too)."""
    from PIL import Image as PILImage

    from clipscope.thumbnails import content_hash, thumbnail_relpath
    from worker.precompute.stage import thumbnails

    rng = np.random.default_rng(4)
    images = [PILImage.fromarray(rng.integers(0, 255, (20 + 7 * i, 30 + 3 * i, 3), dtype=np.uint8)) for i in range(23)]
    dataset = [(image, 0) for image in images]
    rows = [5, 0, 22, 5, *range(1, 20, 3)]
    got = thumbnails(tmp_path, dataset, rows, 16, threads=4)
    expected = [(content_hash(images[r]), thumbnail_relpath(content_hash(images[r])), images[r].width, images[r].height) for r in rows]
    assert got == expected
    assert sorted(p.name for p in (tmp_path / "thumbnails").rglob("*.webp")) == sorted({f"{h}.webp" for h, *_ in expected})


def test_an_image_that_fails_its_thumbnail_stops_the_others_at_once(tmp_path):
    """The error reaches the caller without every queued image being read first."""
    import time

    from PIL import Image as PILImage

    from worker.precompute.stage import thumbnails

    read = []

    class Broken:
        def __getitem__(self, row):
            read.append(row)
            if row == 3:
                raise OSError("image 3 is truncated")
            time.sleep(0.005)
            return PILImage.new("RGB", (20, 20), (row, 0, 0)), 0

    with pytest.raises(OSError, match="image 3 is truncated"):
        thumbnails(tmp_path, Broken(), list(range(1000)), 16, threads=2)
    assert len(read) < 500  # reading them all would take 2.5 s


def test_top_examples_of_a_patch_sae_keep_where_the_feature_fired(tmp_path):
    """Over 5 tokens an image's activation is its maximum over them, and each top example stores its
    activation on every token as a byte fraction of that maximum; CLS-only SAEs store none."""
    from clipscope.sae.model import TopKSAE
    from worker.precompute.stage import compute

    torch.manual_seed(0)
    sae = TopKSAE(D, D_SAE, K)
    acts = np.random.default_rng(3).normal(size=(60, 5, D)).astype(np.float16)
    cache = array_cache(tmp_path / "acts", acts, tokens="all")
    tb = compute(sae, cache, PC, tmp_path / "spill", "cpu")
    with torch.no_grad():
        x = torch.from_numpy(acts.astype(np.float32).reshape(-1, D))
        z = torch.cat([sae.encode(x[i : i + 50]).to_dense() for i in range(0, len(x), 50)]).view(60, 5, D_SAE)
    checked = 0
    for f in range(D_SAE):
        for slot, row in enumerate(tb.top.payload[f].tolist()):
            if row < 0:
                continue
            tokens = z[row, :, f]
            assert tb.top.values[f, slot].item() == pytest.approx(tokens.max().item(), rel=1e-6)
            expected = (tokens / tokens.max() * 255).round().clamp(0, 255)
            assert tb.top.extra[f, slot].tolist() == expected.to(torch.uint8).tolist()
            checked += 1
    assert checked > D_SAE
    cls = compute(sae, array_cache(tmp_path / "cls", acts[:, 0]), PC, tmp_path / "spill2", "cpu")
    assert cls.top.extra is None


def test_token_maps_round_trip_through_the_database(trained):
    """On both engines (BLOB / BYTEA): each stored top example's map is its activation on every token."""
    ctx, key, sae, _, dataset, _ = trained
    acts = np.random.default_rng(4).normal(size=(N, 5, D)).astype(np.float16)
    cache = array_cache(ctx.layout.activations, acts, name="tokens", tokens="all")
    precompute(ctx, key, sae, cache, dataset, PC)
    with torch.no_grad():
        x = torch.from_numpy(acts.astype(np.float32).reshape(-1, D))
        z = torch.cat([sae.encode(x[i : i + PC.batch_size]).to_dense() for i in range(0, len(x), PC.batch_size)]).view(N, 5, D_SAE)
    with session_scope(ctx.database_url) as s:
        rows = s.execute(select(FeatureExample.feature, FeatureExample.bucket, Image.index, FeatureExample.token_map)
                         .join(Image, Image.id == FeatureExample.image_id)).all()
    top = [r for r in rows if r.bucket == -1]
    assert top and all(r.token_map is None for r in rows if r.bucket >= 0)
    for feature, _, image, stored in top:
        tokens = z[image, :, feature]  # the synthetic dataset's index is the cache row
        assert list(bytes(stored)) == (tokens / tokens.max() * 255).round().to(torch.uint8).tolist()


def test_the_precompute_keeps_the_classifier_of_its_classes_that_explanations_read(web_data, tmp_path):
    """The explorer explains an upload's prediction over the precompute set's classes with the evaluation's
    templates; the precompute builds that classifier once and keeps it (clipscope/clip/classifiers.py)."""
    import shutil

    from clipscope.clip.classifiers import classifier_file
    from clipscope.clip.loading import provenance
    from clipscope.clip.zeroshot import template_set
    from tests.conftest import TINY, copy_data_dir
    from worker.context import Context
    from worker.pipeline import run_precompute

    settings, _ = web_data
    copy_data_dir(settings.data_dir, tmp_path / "data")
    ctx = Context(settings.model_copy(update={"data_dir": tmp_path / "data"}))
    kept = ctx.layout.models / "classifiers"
    shutil.rmtree(kept)
    cfg = parse_config(TINY)
    assert run_precompute(ctx, cfg).reused  # every stage was finished: only the classifier is new
    classes = build_dataset(cfg.precompute_data, ctx.layout.datasets, False).classes
    path = classifier_file(kept, provenance(cfg.model), classes, template_set(cfg.evaluate.templates)[1])
    assert [p.name for p in kept.iterdir()] == [path.name]
