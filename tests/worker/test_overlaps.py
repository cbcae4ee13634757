"""The features two SAEs at one hook site share (``sae_overlaps``), measured by the precompute: on the two
SAEs of ``two_saes`` (tests/conftest.py), against the cosines computed directly from their files."""

import logging
import shutil

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from clipscope.db.models import Feature, Sae, SaeOverlap
from clipscope.db.session import session_scope
from clipscope.matching import overlap_summary, unit_atoms
from clipscope.overlap_rows import chance_level
from clipscope.sae.io import load_sae
from tests.conftest import copy_data_dir
from worker.context import Context
from worker.precompute.overlaps import update_overlaps


@pytest.fixture
def copied(two_saes, tmp_path):
    settings, keys = two_saes
    copy_data_dir(settings.data_dir, tmp_path / "data")
    return Context(settings.model_copy(update={"data_dir": tmp_path / "data"})), keys


def _live_unit_atoms(ctx, key):
    with session_scope(ctx.database_url) as s:
        sae_id = s.scalar(select(Sae.id).where(Sae.key == key))
        live = s.scalars(select(Feature.idx).where(Feature.sae_id == sae_id, Feature.n_active > 0).order_by(Feature.idx)).all()
    return unit_atoms(load_sae(ctx.layout.saes / key / "sae")[0].W_dec)[live]


def _stored(ctx):
    with session_scope(ctx.database_url) as s:
        keys = dict(s.execute(select(Sae.id, Sae.key)).all())
        return {(keys[o.sae_id], keys[o.other_id]): o.summary for o in s.scalars(select(SaeOverlap))}


def test_the_precompute_measures_both_directions_of_a_pair_as_the_atoms_say(two_saes):
    settings, (a, b) = two_saes
    ctx = Context(settings)
    stored = _stored(ctx)
    assert set(stored) == {(a, b), (b, a)}
    atoms_a, atoms_b = _live_unit_atoms(ctx, a), _live_unit_atoms(ctx, b)
    cos = atoms_a @ atoms_b.T  # every pair, directly
    for (mine, theirs), best in (((a, b), cos.amax(1)), ((b, a), cos.amax(0))):
        expected = overlap_summary(best, chance_level(len(atoms_b if theirs == b else atoms_a), 768))
        got = stored[(mine, theirs)]
        assert got["features"] == len(best) and got["counts"] == expected["counts"] and sum(got["counts"]) == len(best)
        assert got["median"] == pytest.approx(expected["median"], abs=1e-6) and got["chance"] == pytest.approx(expected["chance"])
        assert got["shared"] == pytest.approx(expected["shared"])
    assert 0 < len(atoms_a) <= 64 and 0 < len(atoms_b) <= 48


def test_a_pair_is_measured_again_only_when_either_precompute_changed(copied, caplog):
    ctx, (a, b) = copied
    assert update_overlaps(ctx, a) == [] and update_overlaps(ctx, b) == [], "both current: nothing to do"
    with session_scope(ctx.database_url) as s:
        row = s.scalar(select(Sae).where(Sae.key == b))
        row.precompute = {**row.precompute, "key": "re-precomputed"}
    from backend.app import create_app

    app = create_app(ctx.settings)
    with TestClient(app) as client:
        assert client.get(f"/api/saes/{a}").json()["shared"] == [], "a stale pair is not shown"
    assert update_overlaps(ctx, a) == [b]
    with session_scope(ctx.database_url) as s:
        assert s.scalar(select(func.count()).select_from(SaeOverlap)) == 2, "replaced, not added"
    with TestClient(create_app(ctx.settings)) as client:
        (shared,) = client.get(f"/api/saes/{a}").json()["shared"]
        assert (shared["sae"], shared["d_sae"]) == (b, 48) and shared["counts"] == _stored(ctx)[(a, b)]["counts"]
        page = client.get("/").text
        assert "Features shared with other SAEs at this site" in page and f'<a href="#sae-{b}">{b}</a>' in page
        lacks = f'/saes/{a}/features?matched_in={b}&amp;dead=hide'
        assert f'<a href="{lacks}">features it lacks</a>' in page
        assert client.get(lacks.replace("&amp;", "&")).status_code == 200 and f"best cosine in {b}" in client.get(lacks.replace("&amp;", "&")).text
    shutil.rmtree(ctx.layout.saes / b)
    with session_scope(ctx.database_url) as s:
        row = s.scalar(select(Sae).where(Sae.key == b))
        row.precompute = {**row.precompute, "key": "again"}
    caplog.set_level(logging.INFO, logger="worker.precompute.overlaps")
    assert update_overlaps(ctx, a) == []
    assert f"overlap with {b} skipped:" in caplog.text and "is not an SAE folder" in caplog.text


def test_an_sae_at_another_block_is_no_pair(copied):
    ctx, (a, b) = copied
    with session_scope(ctx.database_url) as s:
        s.query(SaeOverlap).delete()
        s.scalar(select(Sae).where(Sae.key == b)).layer = 9
    assert update_overlaps(ctx, a) == [] and _stored(ctx) == {}
    with session_scope(ctx.database_url) as s:
        s.scalar(select(Sae).where(Sae.key == b)).layer = 10
    assert update_overlaps(ctx, b) == [a] and set(_stored(ctx)) == {(a, b), (b, a)}


def test_the_report_names_what_each_other_sae_shares(copied, tmp_path):
    from backend.services.report import write_report

    ctx, (a, b) = copied
    summary = _stored(ctx)[(a, b)]
    with session_scope(ctx.database_url) as s:
        text = write_report(s, s.scalar(select(Sae).where(Sae.key == a)), ctx.layout.root, tmp_path / "report", 2, "frequency").read_text()
    line = next(t for t in text.splitlines() if t.startswith(f"- Shared with {b} (topk, 48 latents, k = 8)"))
    assert f"median best cosine {summary['median']:.2f}" in line and f"{100 * summary['shared']['0.7']:.0f} % at 0.7 or more" in line
    assert line.endswith(f"(chance {summary['chance']:.2f}).")


def test_with_overlaps_off_a_run_measures_nothing_and_saes_overlaps_measures_later(copied, monkeypatch, caplog):
    from typer.testing import CliRunner

    from clipscope.config import parse_config
    from clipscope_cli.main import app
    from tests.conftest import TINY
    from worker.pipeline import run_precompute

    ctx, (a, b) = copied
    with session_scope(ctx.database_url) as s:
        s.query(SaeOverlap).delete()
    caplog.set_level(logging.INFO, logger="clipscope")
    off = parse_config({**TINY, "name": "a", "precompute": {**TINY["precompute"], "overlaps": False}})
    assert run_precompute(ctx, off).reused, "the knob is no part of the precompute's key: the finished one is reused"
    assert _stored(ctx) == {} and "not measured (precompute.overlaps = false" in caplog.text
    monkeypatch.setenv("CLIPSCOPE_DATA_DIR", str(ctx.settings.data_dir))
    monkeypatch.setenv("CLIPSCOPE_DEVICE", "cpu")
    runner = CliRunner()
    out = runner.invoke(app, ["saes", "overlaps", b, "no-such-sae"])
    assert "No SAE 'no-such-sae'" in str(out.exception) and _stored(ctx) == {}, "every key checked before any is measured"
    out = runner.invoke(app, ["saes", "overlaps"])
    assert out.exit_code == 0 and out.output.splitlines() == [f"{a}: measured against {b}", f"{b}: every pair at its site current"]
    assert set(_stored(ctx)) == {(a, b), (b, a)}
    assert runner.invoke(app, ["saes", "overlaps", a]).output.strip() == f"{a}: every pair at its site current"
    with session_scope(ctx.database_url) as s:
        s.scalar(select(Sae).where(Sae.key == b)).status = "training"
    out = runner.invoke(app, ["saes", "overlaps", b])
    assert f"not ready: {b} (training)" in str(out.exception)
