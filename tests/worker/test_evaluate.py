import pickle

import numpy as np
import torch
from sqlalchemy import select

from clipscope.config import DatasetSpec, parse_config
from clipscope.db.models import Evaluation, Sae
from clipscope.db.session import session_scope
from clipscope.sae.io import load_sae
from tests.clipscope.test_splice import perfect_sae
from tests.conftest import array_cache
from clipscope.datasets import build_dataset
from worker.evaluate import evaluate, evaluate_dataset, format_table, training_mean
from worker.train.loop import train


def write_cifar10(root, n_train=10, n_test=6, seed=0):
    """A tiny CIFAR-10 in torchvision's extracted on-disk format (cifar-10-batches-py)."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    truth = {}
    for fname, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=n)]
        with open(base / fname, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": fname.encode()}, fh)
        truth[fname] = (data, labels)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": names, "num_cases_per_batch": n_train}, fh)
    return truth, names


def test_cifar_is_read_from_torchvisions_on_disk_format(tmp_path):
    truth, names = write_cifar10(tmp_path / "cifar10")
    test = build_dataset(DatasetSpec(name="cifar10", split="test"), tmp_path, allow_download=False)
    train = build_dataset(DatasetSpec(name="cifar10", split="train"), tmp_path, allow_download=False)
    assert len(test) == 6 and len(train) == 50 and test.classes == names
    data, labels = truth["test_batch"]
    image, label = test[4]
    assert image.size == (32, 32) and label == labels[4]
    assert np.array_equal(np.asarray(image), data[4].reshape(3, 32, 32).transpose(1, 2, 0))
    assert train[12][1] == truth["data_batch_2"][1][2]


def _cfg(datasets):
    return parse_config(
        {"name": "ev", "model": {"pretrained": "none", "layer": 10}, "evaluate": {"datasets": datasets, "batch_size": 4, "templates": ["a photo of a {}."]}}
    )


def test_a_perfect_sae_scores_the_clean_accuracy_on_every_set(ctx, random_clip, tmp_path):
    write_cifar10(ctx.layout.datasets / "cifar10")
    cfg = _cfg([{"name": "cifar10", "split": "test"}, {"name": "synthetic", "split": "test", "synthetic_size": 8, "image_size": 64}])
    mean = torch.zeros(1, 768)
    for spec in cfg.evaluate.datasets:
        result = evaluate_dataset(ctx, cfg, random_clip, perfect_sae(768), mean, spec)
        assert result.accuracy["spliced"] == result.accuracy["clean"] == result.accuracy["spliced_error"]
        assert result.max_error_splice_diff <= 1e-4 and result.n == (6 if spec.name == "cifar10" else 8)
        (ce, kl), (spliced_ce, spliced_kl) = result.loss["clean"], result.loss["spliced"]
        assert kl == 0 and abs(spliced_ce - ce) < 1e-4 and 0 <= spliced_kl < 1e-6, "a perfect reconstruction changes no prediction"
        assert result.loss["mean_ablation"][1] > 0 and ce > 0


def test_results_go_to_the_database_once_and_print_as_the_studys_table(ctx, random_clip):
    cfg = _cfg([{"name": "synthetic", "split": "test", "synthetic_size": 8, "image_size": 64}])
    cache = array_cache(ctx.layout.activations, np.random.default_rng(0).normal(size=(64, 768)))
    small = cfg.model_copy(update={"sae": cfg.sae.model_copy(update={"d_sae": 64, "k": 4}),
                                   "train": cfg.train.model_copy(update={"epochs": 1, "batch_size": 32})})
    trained = train(ctx, small, cache)
    sae, _ = load_sae(trained.sae_dir)
    calls = []
    first = evaluate(ctx, small, trained.sae_key, sae, cache, lambda: calls.append(1) or random_clip)
    assert not first[0].reused and calls == [1]
    with session_scope(ctx.database_url) as s:
        rows = s.scalars(select(Evaluation).join(Sae).where(Sae.key == trained.sae_key)).all()
        assert sorted(r.condition for r in rows) == ["clean", "mean_ablation", "spliced", "spliced_error"]
        assert all(r.n == 8 and r.dataset == "synthetic" and r.n_templates == 1 for r in rows)
    again = evaluate(ctx, small, trained.sae_key, sae, cache, lambda: calls.append(1) or random_clip)
    assert again[0].reused and calls == [1] and again[0].accuracy == first[0].accuracy and again[0].loss == first[0].loss
    assert first[0].loss["clean"][1] == 0 and abs(first[0].loss["spliced_error"][0] - first[0].loss["clean"][0]) < 1e-3
    assert again[0].by_class == first[0].by_class and set(first[0].by_class) == set(first[0].accuracy)
    with session_scope(ctx.database_url) as s:  # rows from before the per-class tallies were kept
        for r in s.scalars(select(Evaluation)):
            r.details = {k: v for k, v in r.details.items() if k != "by_class"}
        before = s.scalar(select(Sae.updated_at).where(Sae.key == trained.sae_key))
    redone = evaluate(ctx, small, trained.sae_key, sae, cache, lambda: calls.append(1) or random_clip)
    assert not redone[0].reused and calls == [1, 1] and redone[0].by_class == first[0].by_class
    with session_scope(ctx.database_url) as s:  # the explorer's per-SAE copies of evaluation results follow it
        assert s.scalar(select(Sae.updated_at).where(Sae.key == trained.sae_key)) > before
        clean = s.scalar(select(Evaluation).where(Evaluation.condition == "clean"))  # tallied before the feature supports were
        clean.details = {**clean.details, "by_class": {k: v for k, v in clean.details["by_class"].items() if k != "features"}}
    assert not evaluate(ctx, small, trained.sae_key, sae, cache, lambda: calls.append(1) or random_clip)[0].reused and calls == [1, 1, 1]
    with session_scope(ctx.database_url) as s:  # rows from before the losses were kept are evaluated again
        for r in s.scalars(select(Evaluation)):
            r.details = {k: v for k, v in r.details.items() if k not in ("ce", "kl")}
    redone = evaluate(ctx, small, trained.sae_key, sae, cache, lambda: calls.append(1) or random_clip)
    assert not redone[0].reused and calls == [1, 1, 1, 1] and redone[0].loss == first[0].loss
    table = format_table(first)
    assert "clean" in table and "drop pp" in table and "synthetic/test" in table
    mean = training_mean(cache)
    torch.testing.assert_close(mean[0], torch.from_numpy(cache.activations()[:, 0].astype(np.float64).mean(0)).float())


def test_an_unlabelled_image_folder_cannot_be_evaluated_and_says_why(ctx, random_clip, tmp_path):
    import pytest
    from PIL import Image

    from clipscope.errors import ClipScopeError

    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(tmp_path / f"{i}.png")  # no class folders
    cfg = _cfg([{"name": "imagefolder", "root": str(tmp_path), "split": "test"}])
    with pytest.raises(ClipScopeError, match=r"imagefolder at .+ has no class names: .+ one sub-folder per class"):
        evaluate_dataset(ctx, cfg, random_clip, perfect_sae(768), torch.zeros(1, 768), cfg.evaluate.datasets[0])


def test_per_class_tallies_match_clip_s_own_predictions(ctx, random_clip):
    """Each class's image count, top-1 hits and most frequent mistake, clean from CLIP's own forward
    pass; every condition's tallies add up to its accuracy."""
    from collections import Counter

    from clipscope.clip.preprocess import build_transform, preprocess_descriptor
    from clipscope.clip.zeroshot import build_classifier
    from tests.clipscope.test_splice import lossy_sae

    truth, names = write_cifar10(ctx.layout.datasets / "cifar10", n_test=24, seed=3)
    cfg = _cfg([{"name": "cifar10", "split": "test"}])
    spec = cfg.evaluate.datasets[0]
    result = evaluate_dataset(ctx, cfg, random_clip, lossy_sae(768), torch.zeros(1, 768), spec)
    dataset = build_dataset(spec, ctx.layout.datasets, allow_download=False)
    transform = build_transform(preprocess_descriptor(cfg.model))
    with torch.no_grad():
        images = torch.stack([transform(dataset[i][0]) for i in range(len(dataset))])
        emb = random_clip.model.encode_image(images, normalize=True)
        predicted = (emb @ build_classifier(random_clip.model, "ViT-B-32", names, ["a photo of a {}."], "cpu")).argmax(1).tolist()
    labels = truth["test_batch"][1]
    by = result.by_class
    assert all(t["classes"] == names and t["n"] == [labels.count(c) for c in range(10)] for t in by.values())
    assert by["clean"]["hits"] == [sum(1 for y, p in zip(labels, predicted) if y == p == c) for c in range(10)]
    for c in range(10):
        wrong = Counter(p for y, p in zip(labels, predicted) if y == c and p != c)
        other, times = by["clean"]["mistaken_for"][c]
        assert times == max(wrong.values(), default=0) and (other == -1 if not wrong else wrong[other] == times)
    for condition, (top1, _) in result.accuracy.items():
        assert sum(by[condition]["hits"]) == round(top1 * result.n)
    assert by["spliced"]["hits"] != by["clean"]["hits"], "a lossy SAE changes some class's hits"
    hurt = max(range(10), key=lambda c: (by["clean"]["hits"][c] - by["spliced"]["hits"][c]) / max(by["clean"]["n"][c], 1))
    assert f"classes the splice hurts most: {names[hurt]} " in format_table([result])


def test_the_losses_are_the_cross_entropy_and_the_kl_from_clean_in_nats():
    from clipscope.clip.zeroshot import loss_sums

    g = torch.Generator().manual_seed(0)
    clean, other, labels = 30 * torch.randn(6, 5, generator=g), 30 * torch.randn(6, 5, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])
    ce, kl = loss_sums(other, clean, labels)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(other.double(), labels, reduction="sum"))
    torch.testing.assert_close(kl, torch.nn.functional.kl_div(other.double().log_softmax(1), clean.double().log_softmax(1),
                                                              log_target=True, reduction="sum"))
    assert loss_sums(clean, clean, labels)[1] == 0 and ce.dtype == kl.dtype == torch.float64


def test_loss_recovered_reads_between_mean_ablation_and_clean():
    from clipscope.evaluation_summary import loss_recovered

    assert loss_recovered(0.25, 0.45, 2.25) == 0.9
    assert loss_recovered(0.25, 0.25, 2.25) == 1 and loss_recovered(0.25, 2.25, 2.25) == 0 and loss_recovered(0.25, 3.25, 2.25) == -0.5
    assert loss_recovered(0.25, 0.3, 0.25) is None and loss_recovered(0.25, 0.3, 0.2) is None, "ablating costs nothing: nothing to recover"
    assert loss_recovered(None, 0.3, 2.0) is None


def test_the_table_gives_the_relative_drop_and_no_number_where_clean_accuracy_is_zero():
    from worker.evaluate import EvalResult

    def row(clean: float, spliced: float, loss=None) -> str:
        acc = {"clean": (clean, 1.0), "spliced": (spliced, 1.0), "spliced_error": (clean, 1.0), "mean_ablation": (0.0, 0.5)}
        return format_table([EvalResult("cifar10", "test", 100, "t", acc, 0.0, loss=loss)]).splitlines()[2].split()

    assert row(0.9366, 0.9213)[3:6] == ["92.13%", "1.53", "1.6%"]  # the study's CIFAR-10 drop: 1.53 pp, 1.6 % of 93.66 %
    assert row(0.0, 0.1)[3:6] == ["10.00%", "-10.00", "–"]
    assert row(0.9366, 0.9213)[-2:] == ["–", "–"], "an evaluation without losses"
    loss = {"clean": (0.25, 0.0), "spliced": (0.45, 0.1234), "spliced_error": (0.25, 0.0), "mean_ablation": (2.25, 1.5)}
    assert row(0.9366, 0.9213, loss)[-2:] == ["90.0%", "0.1234"]
