"""Save and load an SAE as a SAELens folder: ``cfg.json`` + ``sae_weights.safetensors``.

``cfg.json`` holds SAELens' own keys (so ``SAE.load_from_disk`` reads it) and a ``clipscope``
object with what ClipScope needs: model, weights provenance, layer, token mode, normalisation,
recipe, metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clipscope.errors import ClipScopeError
from clipscope.sae.model import TopKSAE
from clipscope.storage import atomic_dir, atomic_write_json, read_json

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAE_LENS_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


def sae_lens_cfg(sae: TopKSAE, meta: dict[str, Any]) -> dict[str, Any]:
    layer = meta.get("layer")
    return {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "model_name": meta.get("model", ""),
        "hook_name": f"blocks.{layer}.hook_resid_post",
        "hook_layer": layer,
        "hook_head_index": None,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": sae.k},
        "apply_b_dec_to_input": sae.use_b_dec,
        "finetuning_scaling_factor": False,
        "normalize_activations": meta.get("normalization", "none"),
        "context_size": meta.get("context_size"),
        "prepend_bos": False,
        "dataset_path": meta.get("dataset", ""),
        "model_from_pretrained_kwargs": {},
        "clipscope": meta,
    }


def sae_files(sae: TopKSAE, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What an SAE folder holds: SAELens' tensors, copied to host memory (a snapshot), and its config."""
    tensors = {name: getattr(sae, name).detach().to("cpu", copy=True).contiguous() for name in SAE_LENS_TENSORS}
    return tensors, sae_lens_cfg(sae, meta)


def write_files(folder: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
    """Write :func:`sae_files`' output into an existing folder (callers make it atomic)."""
    save_file(tensors, str(folder / WEIGHTS_FILE))
    atomic_write_json(folder / CFG_FILE, cfg)


def write_sae_files(sae: TopKSAE, folder: Path, meta: dict[str, Any]) -> None:
    """Write the two files into an existing folder (callers make it atomic)."""
    write_files(folder, *sae_files(sae, meta))


def save_sae(sae: TopKSAE, folder: Path, meta: dict[str, Any]) -> None:
    """Atomically (re)place ``folder`` with the SAE's weights and config."""
    with atomic_dir(Path(folder)) as tmp:
        write_sae_files(sae, tmp, meta)


def load_sae(folder: Path, device: str | torch.device = "cpu") -> tuple[TopKSAE, dict[str, Any]]:
    """Load an SAE folder; returns the module (eval mode) and ClipScope's metadata."""
    folder = Path(folder)
    if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ClipScopeError(f"{folder} is not an SAE folder (needs {CFG_FILE} and {WEIGHTS_FILE}).")
    cfg = read_json(folder / CFG_FILE)
    k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if k is None:
        raise ClipScopeError(f"{folder / CFG_FILE} has no activation_fn_kwargs.k: not a TopK SAE.")
    sae = TopKSAE(cfg["d_in"], cfg["d_sae"], k, use_b_dec=bool(cfg.get("apply_b_dec_to_input", True)))
    tensors = load_file(str(folder / WEIGHTS_FILE))
    with torch.no_grad():
        for name in SAE_LENS_TENSORS:  # W_enc copies into the transposed view of encoder_weight
            getattr(sae, name).copy_(tensors[name])
    return sae.to(device).eval(), cfg.get("clipscope", {})
