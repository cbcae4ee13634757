"""Steering over a labelled set (``clipscope steer``): the edited predictions are the per-image
steering's, the clean ones the evaluation's, and bad questions are one sentence."""

import json
import subprocess
import sys

import pytest
import torch

from clipscope.config import parse_config
from clipscope.errors import ClipScopeError
from tests.conftest import TINY
from worker.context import Context
from worker.pipeline import run_steer


def _per_image(settings, key, edits):
    """Each test image's label, its clean and edited top-1 class and the edited features' activations,
    one image at a time through ``clipscope.steering.steer``."""
    from clipscope.clip.hooks import residual_at
    from clipscope.clip.loading import load_clip
    from clipscope.clip.preprocess import build_transform, preprocess_descriptor
    from clipscope.clip.zeroshot import build_classifier
    from clipscope.config import ModelConfig
    from clipscope.sae.io import load_sae
    from clipscope.steering import steer
    from clipscope.datasets.synthetic import SyntheticShapes

    cfg = ModelConfig(pretrained="none", layer=10)
    clip, sae = load_clip(cfg), load_sae(settings.data_dir / "saes" / key / "sae")[0]
    data = SyntheticShapes(10, "test", image_size=64)
    classifier = build_classifier(clip.model, cfg.name, data.classes, TINY["evaluate"]["templates"], "cpu")
    transform = build_transform(preprocess_descriptor(cfg))
    out = []
    with torch.no_grad():
        for image, label in (data[i] for i in range(len(data))):
            resid = residual_at(clip.visual, transform(image)[None], 10)
            st = steer(clip.model, sae, resid, 10, "cls", classifier, data.classes, edits)
            out.append((label, int(st.clean.argmax()), int(st.steered.argmax()), st.before))
    return data.classes, out


def test_the_edited_accuracy_over_a_set_is_the_per_image_steering_s(web_data):  # noqa: F811
    """Strong edits (two features set far above their largest activations) move most predictions:
    the set's per-class tallies, clean and edited, are those of the images steered one at a time."""
    from clipscope.feature_edits import Edit, parse_edits
    from worker.evaluate import per_class

    settings, key = web_data
    edits = "3*0, 17=40, 40=25"
    (r,) = run_steer(Context(settings), parse_config(TINY), edits)
    classes, images = _per_image(settings, key, list(parse_edits(edits, 64)))
    assert r.n == len(images) == 10 and r.edits == [Edit(3, 0.0, True), Edit(17, 40.0), Edit(40, 25.0)]
    k = len(classes)
    for c, column in (("clean", 1), ("edited", 2)):
        confusion = torch.zeros(k * k, dtype=torch.long)
        for row in images:
            confusion[row[0] * k + row[column]] += 1
        assert r.by_class[c] == per_class(classes, {c: confusion})[c]
        assert r.accuracy[c][0] == pytest.approx(sum(row[0] == row[column] for row in images) / 10)
    assert r.by_class["edited"] != r.by_class["clean"], "the edits move the predictions"
    changes = r.class_changes()
    assert changes == sorted(changes, key=lambda x: (x["change_pp"], x["class"])), "most lowered first, then by name"
    assert {x["class"] for x in changes} == {classes[row[0]] for row in images}, "every class with images, and only those"
    before = torch.tensor([row[3] for row in images])  # [images, edits]
    assert r.mean_activation == pytest.approx(before.double().mean(0).tolist(), rel=1e-5, abs=1e-7)
    assert r.fired == pytest.approx((before > 0).double().mean(0).tolist())
    payload = r.as_dict()
    assert payload["edits"][0] == {"index": 3, "op": "scale", "value": 0.0} and payload["classes"] == changes


def test_the_clean_side_is_the_evaluation_s_and_an_edit_that_changes_nothing_changes_nothing(web_data):  # noqa: F811
    from clipscope.db.models import Evaluation
    from clipscope.db.session import session_scope
    from sqlalchemy import select

    settings, key = web_data
    (r,) = run_steer(Context(settings), parse_config(TINY), "5*1, 9*1")
    assert r.accuracy["edited"] == r.accuracy["clean"] and r.by_class["edited"] == r.by_class["clean"]
    with session_scope(settings.resolved_database_url) as s:
        clean = s.scalar(select(Evaluation).where(Evaluation.condition == "clean"))
        assert r.accuracy["clean"] == pytest.approx((clean.top1, clean.top5))
        assert r.by_class["clean"]["hits"] == clean.details["by_class"]["hits"]


@pytest.mark.parametrize("edits, datasets, says", [
    ("5 = zero", None, "Cannot read the edit '5 = zero'"),
    ("64=0", None, "Feature 64 does not exist: this SAE has features 0 to 63"),
    (" , ", None, "Name at least one edit"),
    ("5=0", ["cifar10"], "No evaluation set of the config is named cifar10 (the config's: synthetic)"),
])
def test_a_question_that_cannot_be_asked_says_why(web_data, edits, datasets, says):  # noqa: F811
    settings, _ = web_data
    with pytest.raises(ClipScopeError, match=says.replace("(", r"\(").replace(")", r"\)")):
        run_steer(Context(settings), parse_config(TINY), edits, datasets)


def _toml(value) -> str:
    """``value`` as an inline TOML value (tables inline, strings as JSON writes them)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def test_the_command_prints_the_answer_and_writes_it_as_json(web_data, tmp_path):  # noqa: F811
    import os
    import shutil

    settings, _ = web_data
    config = tmp_path / "web.toml"
    config.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in TINY.items()))
    shutil.copytree(settings.data_dir, tmp_path / "data")  # a private copy: whatever the command does stays there
    env = {"CLIPSCOPE_DATA_DIR": str(tmp_path / "data"), "CLIPSCOPE_DEVICE": "cpu", "CLIPSCOPE_NUM_WORKERS": "0", "CLIPSCOPE_PROGRESS": "false"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "clipscope_cli", "steer", str(config), *args], capture_output=True,  # noqa: E731
                                       text=True, env={**os.environ, **env}, timeout=300)
    proc = run("--edits", "3*0, 17=4", "--json", str(tmp_path / "out.json"))
    assert proc.returncode == 0, proc.stderr
    assert "synthetic/test (10 images): top-1" in proc.stdout and "#17 = 4: fires on" in proc.stdout
    assert "== train: reused" in proc.stderr, "the config is the trained SAE's"
    (written,) = json.loads((tmp_path / "out.json").read_text())
    assert written["n"] == 10 and [e["index"] for e in written["edits"]] == [3, 17]
    bad = run("--edits", "3 = zero")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: Cannot read the edit") and "Traceback" not in bad.stderr


def test_bad_edits_are_refused_before_anything_is_extracted(web_data, tmp_path):  # noqa: F811
    settings, _ = web_data
    fresh = settings.model_copy(update={"data_dir": tmp_path / "data", "database_url": None})
    with pytest.raises(ClipScopeError, match="Feature 64 does not exist"):
        run_steer(Context(fresh), parse_config(TINY), "64=0")
    assert not (tmp_path / "data" / "activations").exists()
