"""The console command, end to end on random-initialised CLIP and synthetic images."""

import os
import subprocess
import sys

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from clipscope.db.models import Sae, SaeStatus, TrainingPoint
from clipscope.db.session import session_scope
from clipscope.errors import ClipScopeError
from clipscope.settings import get_settings
from clipscope_cli.main import app

CONFIG = """
name = "cli"
[model]
pretrained = "none"
layer = 10
[data]
name = "synthetic"
synthetic_size = 24
image_size = 64
[extract]
batch_size = 8
[sae]
d_sae = 256
k = 8
[train]
recipe = "topk"
epochs = 3
batch_size = 8
holdout_fraction = 0.25
log_every = 2
eval_every = 4
[evaluate]
batch_size = 8
templates = ["a photo of a {}."]
[[evaluate.datasets]]
name = "synthetic"
split = "test"
synthetic_size = 10
image_size = 64
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSCOPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CLIPSCOPE_NUM_WORKERS", "0")
    monkeypatch.setenv("CLIPSCOPE_DEVICE", "cpu")
    monkeypatch.setenv("CLIPSCOPE_PROGRESS", "false")
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_synthetic_extract_then_train_through_the_cli(env, caplog):
    caplog.set_level("INFO")
    (env / "run.toml").write_text(CONFIG)
    runner = CliRunner()
    out = runner.invoke(app, ["extract", str(env / "run.toml")])
    assert out.exit_code == 0, out.output
    assert "synthetic/train: extracted 24" in caplog.text
    out = runner.invoke(app, ["train", str(env / "run.toml")])
    assert out.exit_code == 0, out.output
    assert "synthetic/train: reused" in caplog.text and "trained 9 steps" in caplog.text
    url = get_settings().resolved_database_url
    with session_scope(url) as s:
        sae = s.scalar(select(Sae))
        assert sae.status == SaeStatus.TRAINED and sae.random_weights and sae.pretrained == "none"
        assert sae.metrics["l0"] <= 8
        assert len(s.scalars(select(TrainingPoint)).all()) == 5
    sae_dir = env / "data" / "saes" / sae.key / "sae"
    assert (sae_dir / "cfg.json").is_file() and (sae_dir / "sae_weights.safetensors").is_file()
    caplog.clear()
    out = runner.invoke(app, ["run", str(env / "run.toml")])
    assert out.exit_code == 0, out.output
    assert "== train: reused" in caplog.text
    assert "synthetic/test evaluated (10 images" in caplog.text
    assert "clean  spliced  drop pp" in out.output


def test_bad_config_exits_2_with_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[sae]\nd_sae = 4\nk = 9\n')
    proc = subprocess.run([sys.executable, "-m", "clipscope_cli", "train", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: Config") and "exceeds d_sae" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, says", [
    (["import", "some-sae", "missing.jsonl"], "does not exist"),
    (["export", "some-sae", "--format", "xml"], "'xml' is not one of"),
    (["users", "add"], "Missing argument 'username'"),
    (["no-such-stage"], "No such command 'no-such-stage'"),
    (["serve", "--port", "70000"], "Invalid value for '--port'"),
])
def test_a_usage_error_is_a_message_and_exit_code_2_never_a_traceback(tmp_path, args, says):
    proc = subprocess.run([sys.executable, "-m", "clipscope_cli", *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "CLIPSCOPE_DATA_DIR": str(tmp_path / "data")}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert says in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was touched


def test_a_database_or_folder_that_cannot_be_used_is_one_line_and_exit_code_2(tmp_path):
    (tmp_path / "a-file").write_text("")
    for env, says in (
        ({"CLIPSCOPE_DATABASE_URL": "postgresql+psycopg://nobody:secret@127.0.0.1:1/db"},  # nothing listens on port 1
         "error: Cannot use the database postgresql+psycopg://nobody:***@127.0.0.1:1/db: connection failed"),
        ({"CLIPSCOPE_DATA_DIR": str(tmp_path / "a-file" / "data")}, f"error: Not a directory: {tmp_path / 'a-file' / 'data'}"),
    ):
        proc = subprocess.run([sys.executable, "-m", "clipscope_cli", "export", "some-sae"], capture_output=True, text=True,
                              cwd=tmp_path, env={**os.environ, **env})
        assert proc.returncode == 2 and proc.stderr.strip().startswith(says), proc.stderr
        assert "Traceback" not in proc.stderr and "secret" not in proc.stderr


def test_version_names_clipscope_and_what_decides_its_results():
    from importlib.metadata import version

    import clipscope

    out = CliRunner().invoke(app, ["--version"])
    assert out.exit_code == 0
    assert out.output.strip() == ", ".join([f"clipscope {clipscope.__version__}", *(
        f"{name} {version(name)}" for name in ("torch", "torchvision", "open_clip_torch", "fastapi", "sqlalchemy"))])


def test_serving_on_a_port_in_use_is_one_sentence_before_any_url_or_pipeline(tmp_path):
    import socket

    env = {**os.environ, "CLIPSCOPE_DATA_DIR": str(tmp_path / "data")}
    subprocess.run([sys.executable, "-m", "clipscope_cli", "db", "upgrade"], check=True, capture_output=True, cwd=tmp_path, env=env)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in ("serve", "demo"):  # the demo says so before its minutes of pipeline
            proc = subprocess.run([sys.executable, "-m", "clipscope_cli", command, "--port", str(port)], capture_output=True, text=True,
                                  cwd=tmp_path, env=env, timeout=120)
            assert proc.returncode == 2 and "http://" not in proc.stderr, proc.stderr
            assert proc.stderr.strip() == f"error: Cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port or --host."
    assert not (tmp_path / "data" / "activations").exists()


def test_labels_export_and_import_through_the_cli(env, tmp_path):
    (env / "run.toml").write_text(CONFIG)
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(env / "run.toml")]).exit_code == 0
    url = get_settings().resolved_database_url
    with session_scope(url) as s:
        from backend.services.labels import save_label

        sae = s.scalar(select(Sae))
        save_label(s, sae, 1, "first", "semantic", "ann", 0)
        key = sae.key
    out = runner.invoke(app, ["export", key[:-1]])
    assert isinstance(out.exception, ClipScopeError) and str(out.exception).endswith(f"; its SAEs: {key}."), "a mistyped key names the right one"
    out = runner.invoke(app, ["export", key, "--format", "csv", "-o", str(tmp_path / "l.csv")])
    assert out.exit_code == 0, out.output
    assert "first" in (tmp_path / "l.csv").read_text()
    (tmp_path / "new.jsonl").write_text('{"feature": 2, "text": "second", "category": "noise", "author": "bob"}\n')
    out = runner.invoke(app, ["import", key, str(tmp_path / "new.jsonl")])
    assert out.exit_code == 0 and "added 1" in out.output
    out = runner.invoke(app, ["export", key])
    assert '"text": "second"' in out.output and '"text": "first"' in out.output
    probe = ("import sys; from typer.testing import CliRunner; from clipscope_cli.main import app; "
             f"out = CliRunner().invoke(app, ['export', {key!r}]); assert '\"second\"' in out.output, out.output; print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=env, env={**os.environ})
    assert proc.returncode == 0 and proc.stdout.strip() == "False", ("exporting labels loads no torch (3 s here)", proc.stdout, proc.stderr[-800:])
    (tmp_path / "latin1.csv").write_bytes("feature,text,category,author\n3,crème,noise,bob\n".encode("latin-1"))
    out = runner.invoke(app, ["import", key, str(tmp_path / "latin1.csv")])
    assert isinstance(out.exception, ClipScopeError) and "latin1.csv: The file is not UTF-8 text" in str(out.exception)


def test_an_sae_key_that_names_nothing_says_what_there_is(env):
    out = CliRunner().invoke(app, ["export", "some-sae"])
    assert isinstance(out.exception, ClipScopeError)
    assert str(out.exception).endswith("; it has none yet (`clipscope run CONFIG` makes one).")


def test_saes_list_then_remove_asks_for_yes_without_a_terminal_and_vacuum_gives_the_space_back(env):
    import json

    (env / "run.toml").write_text(CONFIG)
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(env / "run.toml")]).exit_code == 0
    with session_scope(get_settings().resolved_database_url) as s:
        from backend.services.labels import save_label

        sae = s.scalar(select(Sae))
        key = sae.key
        for feature in range(200):  # ~0.4 MB of labels: pages the vacuum gives back
            save_label(s, sae, feature, f"{feature} " + "berries " * 240, "semantic", "ann", 0)
    out = runner.invoke(app, ["saes", "list"])
    header, row = out.output.splitlines()
    assert header.split()[:3] == ["KEY", "STATUS", "RECIPE"] and row.split()[:5] == [key, "trained", "topk", "256", "8"]
    (listed,) = json.loads(runner.invoke(app, ["saes", "list", "--json"]).output)
    assert (listed["key"], listed["d_sae"], listed["labelled"]) == (key, 256, 200) and listed["disk_bytes"] > 0

    out = runner.invoke(app, ["saes", "remove", key, "--yes"])
    assert isinstance(out.exception, ClipScopeError) and f"SAE {key} has 200 label revisions" in str(out.exception)
    out = runner.invoke(app, ["saes", "remove", key, "--discard-labels"])
    assert isinstance(out.exception, ClipScopeError) and "Nothing removed: pass --yes" in str(out.exception)
    assert f"{key} (trained, topk, 256 latents, 200 label revisions)" in out.output
    assert (env / "data" / "saes" / key).is_dir()
    out = runner.invoke(app, ["saes", "remove", key, "--yes", "--discard-labels", "--caches"])
    assert out.exit_code == 0, out.output
    assert f"removed {key}: 0 features, 0 examples, 200 label revisions" in out.output and "removed 1 activation cache" in out.output
    assert runner.invoke(app, ["saes", "list"]).output.startswith("no SAEs yet")
    assert not (env / "data" / "saes" / key).exists() and not any((env / "data" / "activations").iterdir())
    from clipscope.db.vacuum import sqlite_bytes

    db = env / "data" / "clipscope.db"
    import sqlite3

    with sqlite3.connect(db) as conn:  # the log written into the file first: what is left to give back is free pages
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = sqlite_bytes(db)
    out = runner.invoke(app, ["db", "vacuum"])
    assert out.exit_code == 0 and out.output.startswith(f"vacuumed {db}") and sqlite_bytes(db) < before, out.output


def test_set_overrides_make_a_variant_of_the_config_an_sae_of_its_own(env):
    import json

    (env / "run.toml").write_text(CONFIG)
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(env / "run.toml")]).exit_code == 0
    out = runner.invoke(app, ["train", str(env / "run.toml"), "--set", "sae.k=4", "--set", "sae.d_sae=128"])
    assert out.exit_code == 0, out.output
    shapes = {(e["d_sae"], e["k"]) for e in json.loads(runner.invoke(app, ["saes", "list", "--json"]).output)}
    assert shapes == {(256, 8), (128, 4)}
    out = runner.invoke(app, ["train", str(env / "run.toml"), "--set", "sae.width=3"])
    assert isinstance(out.exception, ClipScopeError) and "run.toml --set sae.width=3 is invalid: sae.width:" in str(out.exception)


def test_saes_export_then_import_brings_an_sae_back_whole(env, tmp_path):
    import json

    (env / "run.toml").write_text(CONFIG)
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(env / "run.toml")]).exit_code == 0
    (before,) = json.loads(runner.invoke(app, ["saes", "list", "--json"]).output)
    out = runner.invoke(app, ["saes", "export", before["key"], "-o", str(tmp_path / "one.tar")])
    assert out.exit_code == 0 and f"wrote {tmp_path / 'one.tar'}" in out.output and "0 features" in out.output, out.output
    assert runner.invoke(app, ["saes", "remove", before["key"], "--yes"]).exit_code == 0
    out = runner.invoke(app, ["saes", "import", str(tmp_path / "one.tar")])
    assert out.exit_code == 0 and out.output.startswith(f"imported {before['key']}: 0 features"), out.output
    (after,) = json.loads(runner.invoke(app, ["saes", "list", "--json"]).output)
    assert after == before
    out = runner.invoke(app, ["saes", "import", str(tmp_path / "one.tar")])
    assert isinstance(out.exception, ClipScopeError) and "is already in this database" in str(out.exception)
