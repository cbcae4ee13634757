import torch

from clipscope.clip.classifiers import classifier_file, stored_classifier

WEIGHTS = {"model": "ViT-B-32", "random_init": False, "source": "file", "weights_file": "/a/clip.bin", "sha256": "ab" * 32}


def test_the_file_is_named_by_weights_classes_and_templates_not_by_the_weights_path(tmp_path):
    path = classifier_file(tmp_path, WEIGHTS, ["cat", "dog"], ["a photo of a {}."])
    assert path.parent == tmp_path and path.suffix == ".safetensors"
    assert classifier_file(tmp_path, {**WEIGHTS, "weights_file": "/elsewhere/clip.bin"}, ["cat", "dog"], ["a photo of a {}."]) == path
    others = [
        classifier_file(tmp_path, {**WEIGHTS, "sha256": "cd" * 32}, ["cat", "dog"], ["a photo of a {}."]),
        classifier_file(tmp_path, WEIGHTS, ["dog", "cat"], ["a photo of a {}."]),
        classifier_file(tmp_path, WEIGHTS, ["cat", "dog"], ["a {}."]),
        classifier_file(tmp_path, {"model": "ViT-B-32", "random_init": True, "source": "random", "init_seed": 0}, ["cat", "dog"], ["a photo of a {}."]),
    ]
    assert len({path, *others}) == 5


def test_a_classifier_is_built_once_then_read_back(tmp_path):
    path = classifier_file(tmp_path / "classifiers", WEIGHTS, ["cat", "dog"], ["a photo of a {}."])
    built = []

    def build():
        built.append(1)
        return torch.nn.functional.normalize(torch.randn(512, 2, generator=torch.Generator().manual_seed(len(built))), dim=0)

    first = stored_classifier(path, build, "cpu")
    again = stored_classifier(path, build, "cpu")
    assert len(built) == 1 and path.is_file()
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no partial file left behind"


def test_a_file_that_cannot_be_read_is_built_again_and_replaced(tmp_path):
    path = classifier_file(tmp_path, WEIGHTS, ["cat"], ["a {}."])
    path.write_bytes(b"half a file")
    fresh = torch.ones(512, 1)
    torch.testing.assert_close(stored_classifier(path, lambda: fresh, "cpu"), fresh)
    torch.testing.assert_close(stored_classifier(path, lambda: torch.zeros(512, 1), "cpu"), fresh)
