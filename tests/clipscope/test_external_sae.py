"""SAEs trained elsewhere (SAELens, sparsify) read into a TopKSAE that computes what they compute."""

import json

import pytest
import torch
from safetensors.torch import save_file

from clipscope.errors import ClipScopeError
from clipscope.sae.external import read_external_sae

D_IN, D_SAE, K = 24, 96, 6


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5, "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
            "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}


def _reference(x, w, apply_b_dec=True):
    """The maths both libraries run: top k of (x [- b_dec]) W_enc + b_enc, ReLU'd, then z W_dec + b_dec."""
    pre = ((x - w["b_dec"]) if apply_b_dec else x) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(K, dim=-1)
    code = torch.zeros_like(pre).scatter_(1, top.indices, top.values.relu())
    return code, code @ w["W_dec"] + w["b_dec"]


def saelens_folder(folder, w, **cfg):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, **cfg}))
    return folder


def sparsify_folder(folder, w, **cfg):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": 4, "normalize_decoder": True, "num_latents": D_SAE, "k": K,
                                                 "multi_topk": False, "skip_connection": False, "d_in": D_IN, **cfg}))
    return folder


def _same_maths(sae, w, apply_b_dec=True):
    x = torch.randn(200, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    code, recon = _reference(x, w, apply_b_dec)
    with torch.no_grad():
        x_hat, got = sae(x)
    assert torch.allclose(got.to_dense(), code, atol=1e-5)
    assert torch.allclose(x_hat, recon, atol=1e-4)


@pytest.mark.parametrize("apply_b_dec", [True, False], ids=["b_dec subtracted", "raw input"])
@pytest.mark.parametrize("style", ["v5", "v6"])
def test_a_saelens_topk_sae_computes_what_saelens_computes(tmp_path, apply_b_dec, style):
    w = _weights()
    cfg = {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "hook_name": "blocks.10.hook_resid_post"}
    if style == "v6":
        cfg = {"architecture": "topk", "k": K, "metadata": {"hook_name": "blocks.11.hook_resid_pre"}}  # the same stream: after block 10
    half = {k: v.half() for k, v in w.items()}  # weights saved in fp16 are read as fp32
    sae, info = read_external_sae(saelens_folder(tmp_path / "sae", half, apply_b_dec_to_input=apply_b_dec, normalize_activations="none", **cfg))
    assert (sae.d_in, sae.d_sae, sae.k) == (D_IN, D_SAE, K) and sae.W_dec.dtype == torch.float32
    _same_maths(sae, {k: v.float() for k, v in half.items()}, apply_b_dec)
    assert info["format"] == "saelens" and info["layer"] == 10 and len(info["sha256"]) == 64


def test_a_sparsify_sae_computes_what_sparsify_computes(tmp_path):
    w = _weights(2)
    sae, info = read_external_sae(sparsify_folder(tmp_path / "layers.10", w))
    _same_maths(sae, w)
    assert info["format"] == "sparsify" and info["layer"] is None


@pytest.mark.parametrize(
    "write, says",
    [
        (lambda d, w: saelens_folder(d, w, architecture="standard", activation_fn_str="relu"), "'standard' SAE without a TopK k"),
        (lambda d, w: saelens_folder(d, w, architecture="jumprelu"), "'jumprelu' SAE without a TopK k"),
        (lambda d, w: saelens_folder(d, w, architecture="topk"), "SAE without a TopK k"),
        (lambda d, w: saelens_folder(d, w, architecture="topk", k=K, normalize_activations="expected_average_only_in"), "normalize_activations"),
        (lambda d, w: saelens_folder(d, w, architecture="topk", k=K, hook_name="blocks.10.hook_mlp_out"), "reads 'blocks.10.hook_mlp_out'"),
        (lambda d, w: saelens_folder(d, w, architecture="topk", k=K, rescale_acts_by_decoder_norm=True), "rescale_acts_by_decoder_norm is on"),
        (lambda d, w: saelens_folder(d, w, architecture="topk", k=K, reshape_activations="hook_z"), "reshape_activations = 'hook_z'"),
        (lambda d, w: saelens_folder(d, {**w, "W_dec": w["W_dec"][:, :5]}, architecture="topk", k=K), "shapes do not make one SAE"),
        (lambda d, w: saelens_folder(d, {k: v for k, v in w.items() if k != "b_enc"}, architecture="topk", k=K), "lacks b_enc"),
        (lambda d, w: saelens_folder(d, w, architecture="topk", k=D_SAE + 1), f"k = {D_SAE + 1} is outside 1..{D_SAE}"),
        (lambda d, w: sparsify_folder(d, w, skip_connection=True), "with a skip connection (skip_connection)"),
        (lambda d, w: sparsify_folder(d, w, transcode=True), "with a transcoder (transcode)"),
        (lambda d, w: sparsify_folder(d, w, activation="groupmax"), "activation = 'groupmax'"),
        (lambda d, w: sparsify_folder(d / "layers.3", w) and sparsify_folder(d / "layers.7", w) and d, "It holds SAEs in layers.3, layers.7"),
        (lambda d, w: (saelens_folder(d, w, architecture="topk", k=K) / "cfg.json").unlink() or d, "no cfg.json"),
    ],
    ids=["relu", "jumprelu", "no k", "rescaled inputs", "not the residual stream", "rescaled codes", "per-head inputs", "shapes", "missing tensor", "k too large",
         "skip connection", "transcoder", "groupmax", "several hookpoints", "no config"],
)
def test_what_is_not_a_plain_topk_sae_is_refused_with_the_reason(tmp_path, write, says):
    folder = write(tmp_path / "sae", _weights())
    with pytest.raises(ClipScopeError, match=None) as err:
        read_external_sae(folder)
    assert says in str(err.value)


def test_a_path_that_is_not_a_folder_is_refused(tmp_path):
    with pytest.raises(ClipScopeError, match="is not a folder"):
        read_external_sae(tmp_path / "missing")
