"""sae.import_from: an SAE trained elsewhere goes through evaluation and precompute like a trained one."""

import copy

import pytest
import torch
from sqlalchemy import func, select

from clipscope.config import parse_config
from clipscope.db.models import Evaluation, Feature, Sae, SaeStatus
from clipscope.db.session import session_scope
from clipscope.errors import ClipScopeError
from clipscope.sae.io import load_sae
from clipscope.settings import Settings
from tests.conftest import TINY
from tests.clipscope.test_external_sae import saelens_folder
from worker.context import Context
from worker.pipeline import run_all, run_train

D_SAE, K = 64, 8


def _external(tmp_path, d_in=768, hook="blocks.10.hook_resid_post"):
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(d_in, D_SAE, generator=g) / d_in**0.5, "b_enc": torch.randn(D_SAE, generator=g) * 0.01,
         "W_dec": torch.randn(D_SAE, d_in, generator=g) * 0.1, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    return saelens_folder(tmp_path / "elsewhere", w, architecture="topk", k=K, apply_b_dec_to_input=False, hook_name=hook), w


def _config(folder, **model):
    raw = copy.deepcopy(TINY)
    raw["name"], raw["sae"] = "imported", {"import_from": str(folder)}
    raw["model"].update(model)
    return parse_config(raw)


@pytest.fixture
def ctx(tmp_path):
    return Context(Settings(data_dir=tmp_path / "data", device="cpu", num_workers=0, progress=False, allow_downloads=False))


def test_an_imported_sae_is_evaluated_precomputed_and_ready(ctx, tmp_path):
    folder, w = _external(tmp_path)
    result = run_all(ctx, _config(folder))
    assert result.imported and result.trained_steps == 0
    sae, meta = load_sae(result.sae_dir)
    assert (sae.d_sae, sae.k, meta["recipe"]) == (D_SAE, K, "imported")
    x = torch.randn(50, 768, generator=torch.Generator().manual_seed(1))
    pre = x @ w["W_enc"] + w["b_enc"]  # SAELens with apply_b_dec_to_input = false encodes the raw input
    top = pre.topk(K, dim=-1)
    with torch.no_grad():
        code = sae.encode(x)
    assert torch.allclose(code.to_dense(), torch.zeros_like(pre).scatter_(1, top.indices, top.values.relu()), atol=1e-4)
    with session_scope(ctx.database_url) as s:
        row = s.scalar(select(Sae).where(Sae.key == result.sae_key))
        assert (row.status, row.recipe, row.d_sae, row.k) == (SaeStatus.READY, "imported", D_SAE, K)
        assert row.provenance["format"] == "saelens" and row.provenance["imported_from"] == str(folder.resolve())
        assert set(row.metrics) == {"evr", "mse", "l0"} and row.metrics["l0"] <= K, "no dead share: its training is not known"
        assert s.scalar(select(func.count()).select_from(Feature).where(Feature.sae_id == row.id)) == D_SAE
        assert s.scalar(select(func.count()).select_from(Evaluation).where(Evaluation.sae_id == row.id)) > 0
    again = run_train(ctx, _config(folder))
    assert (again.sae_key, again.imported) == (result.sae_key, False), "a second run reuses the import"


def test_an_sae_of_another_site_or_width_is_refused_when_the_config_is_read(ctx, tmp_path):
    folder, _ = _external(tmp_path)
    with pytest.raises(ClipScopeError, match="after block 10; model.layer = 9 hooks block 9"):
        _config(folder, layer=9)
    narrow, _ = _external(tmp_path / "narrow", d_in=512, hook=None)
    with pytest.raises(ClipScopeError, match="reads 512-dimensional inputs; the residual stream of ViT-B-32 has 768"):
        _config(narrow)
    with pytest.raises(ClipScopeError, match="sae.import_from: .* is not a folder"):
        _config(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipScopeError, match="holds neither"):
        _config(tmp_path / "empty")


def test_a_clipscope_sae_imported_back_measures_and_precomputes_exactly_as_trained(ctx):
    """A ClipScope SAE folder is a SAELens folder: importing one reproduces its held-out metrics and features."""
    trained = run_all(ctx, parse_config(copy.deepcopy(TINY)))
    again = copy.deepcopy(TINY)
    again["name"], again["sae"] = "back", {"import_from": str(trained.sae_dir)}
    imported = run_all(ctx, parse_config(again))
    assert imported.sae_key != trained.sae_key
    assert {k: imported.metrics[k] for k in ("evr", "mse", "l0")} == pytest.approx({k: trained.metrics[k] for k in ("evr", "mse", "l0")}, rel=1e-6)
    with session_scope(ctx.database_url) as s:
        def features(key):
            sae_id = s.scalar(select(Sae.id).where(Sae.key == key))
            return s.execute(select(Feature.idx, Feature.n_active, Feature.max_activation).where(Feature.sae_id == sae_id).order_by(Feature.idx)).all()

        mine, theirs = features(trained.sae_key), features(imported.sae_key)
    assert [(i, n) for i, n, _ in mine] == [(i, n) for i, n, _ in theirs]
    assert [m for *_, m in mine] == pytest.approx([m for *_, m in theirs], rel=1e-5)
