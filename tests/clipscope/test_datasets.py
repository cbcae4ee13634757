import numpy as np
import pytest
from PIL import Image

from clipscope.config import DatasetSpec
from clipscope.errors import ClipScopeError
from clipscope.datasets import build_dataset
from clipscope.datasets.synthetic import SyntheticShapes


def test_synthetic_images_are_deterministic_and_differ_by_index_split_and_seed():
    a = SyntheticShapes(size=10, split="train", seed=0, image_size=64)
    again = SyntheticShapes(size=10, split="train", seed=0, image_size=64)
    img, label = a[3]
    assert img.size == (64, 64) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), np.asarray(again[3][0])) and label == again[3][1]
    assert not np.array_equal(np.asarray(img), np.asarray(a[4][0]))
    assert not np.array_equal(np.asarray(img), np.asarray(SyntheticShapes(10, "test", 0, 64)[3][0]))
    assert not np.array_equal(np.asarray(img), np.asarray(SyntheticShapes(10, "train", 1, 64)[3][0]))
    assert a.classes[label].split()[0] in {"red", "green", "blue", "yellow", "purple", "orange"}
    with pytest.raises(IndexError):
        a[10]


def test_synthetic_labels_cover_many_classes():
    ds = SyntheticShapes(size=300, image_size=32)
    labels = {ds[i][1] for i in range(300)}
    assert len(labels) >= 25 and len(ds.classes) == 30


def test_subsample_is_seeded_sorted_and_limit_applies_after_it(tmp_path):
    spec = DatasetSpec(name="synthetic", synthetic_size=100, subsample=20, seed=3, limit=5, image_size=32)
    ds = build_dataset(spec, tmp_path)
    same = build_dataset(spec, tmp_path)
    other = build_dataset(spec.model_copy(update={"seed": 4}), tmp_path)
    assert len(ds) == 5 and list(ds.indices) == list(same.indices) == sorted(ds.indices)
    assert list(ds.indices) != list(other.indices)
    full = build_dataset(spec.model_copy(update={"limit": None}), tmp_path)
    assert list(full.indices[:5]) == list(ds.indices)


def test_imagefolder_takes_the_class_from_the_first_level_folder(tmp_path):
    for cls, n in (("cats", 2), ("dogs", 1)):
        (tmp_path / cls / "nested").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 10), (i * 50, 0, 0)).save(tmp_path / cls / "nested" / f"{i}.png")
    Image.new("L", (8, 8)).save(tmp_path / "loose.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "cats" / "nested" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: skipped
    (tmp_path / ".thumbnails" / "cats").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / ".thumbnails" / "cats" / "0.png")  # a hidden folder is no class
    ds = build_dataset(DatasetSpec(name="imagefolder", root=tmp_path), tmp_path)
    assert ds.classes == ["cats", "dogs"]
    items = [ds[i] for i in range(len(ds))]
    assert [label for _, label in items] == [-1, 0, 0, 1]  # top-level files first, then folders in order
    assert all(img.mode == "RGB" for img, _ in items)


def test_imagefolder_without_images_fails_clearly(tmp_path):
    with pytest.raises(ClipScopeError, match="holds no images"):
        build_dataset(DatasetSpec(name="imagefolder", root=tmp_path), tmp_path)


def test_missing_torchvision_dataset_without_downloads_names_the_folder(tmp_path):
    with pytest.raises(ClipScopeError, match=str(tmp_path / "food101")):
        build_dataset(DatasetSpec(name="food101"), tmp_path, allow_download=False)


def test_image_keys_differ_by_split_and_are_shared_by_subsets(tmp_path):
    """The database's image rows are keyed by (image key, index): two splits of one size sharing a key
    would show one split's thumbnails for the other's examples."""
    from tests.worker.test_evaluate import write_cifar10

    write_cifar10(tmp_path / "cifar10", n_train=2, n_test=10)  # 5 train batches: one size, only the split tells them apart
    for name, extra in (("synthetic", {"synthetic_size": 10, "image_size": 16}), ("cifar10", {})):
        train, test = (build_dataset(DatasetSpec(name=name, split=split, **extra), tmp_path, allow_download=False) for split in ("train", "test"))
        subset = build_dataset(DatasetSpec(name=name, split="train", limit=3, **extra), tmp_path, allow_download=False)
        assert train.image_key() != test.image_key(), name
        assert subset.image_key() == train.image_key(), name
        assert train.identity() != test.identity() and subset.identity() != train.identity(), name
