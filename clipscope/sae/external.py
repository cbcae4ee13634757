"""TopK SAEs trained elsewhere, read into a :class:`TopKSAE` that computes what they compute.

Two layouts are read:

* **SAELens**: ``cfg.json`` + ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc``,
  ``W_dec [d_sae, d_in]``, ``b_dec``), with ``k`` in ``cfg.json`` (``k``, or
  ``activation_fn_kwargs.k`` in older versions). With ``apply_b_dec_to_input = false`` such an SAE
  encodes the raw input; ClipScope's encoder always subtracts ``b_dec`` first, so the encoder bias
  becomes ``b_enc + b_dec W_enc``, which gives the same pre-activations (to float rounding).
* **EleutherAI sparsify**: ``cfg.json`` (``k``, ``d_in``) + ``sae.safetensors``
  (``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec``, ``b_dec``); an autoencoder (not a
  transcoder) subtracts ``b_dec`` before encoding, as ClipScope does.

Both take the top k of the ReLU'd pre-activations and decode ``z W_dec + b_dec``. Anything else (a
ReLU, gated or JumpReLU SAE, a skip connection, inputs rescaled by a constant only the trainer knew)
is refused with the reason: ClipScope would compute something other than the SAE.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from clipscope.errors import ClipScopeError
from clipscope.sae.model import TopKSAE
from clipscope.storage import read_json

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
TENSORS = {"saelens": ("W_enc", "b_enc", "W_dec", "b_dec"), "sparsify": ("encoder.weight", "encoder.bias", "W_dec", "b_dec")}
_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


@dataclass
class ExternalSAE:
    """A foreign SAE folder as its config and its weights file's header describe it (no tensor read)."""

    folder: Path
    format: str  # "saelens" or "sparsify"
    weights: Path
    cfg: dict[str, Any]
    d_in: int
    d_sae: int
    k: int
    layer: int | None  # the block whose output it reads, when its config names the hook


def inspect_external_sae(folder: Path) -> ExternalSAE:
    """Check that ``folder`` holds a plain TopK SAE ClipScope can compute, reading only ``cfg.json`` and the
    weights file's header: cheap enough to run when a config is read."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ClipScopeError(f"{folder} is not a folder: sae.import_from names the folder of an SAE.")
    if (folder / SAELENS_WEIGHTS).is_file():
        fmt, weights = "saelens", folder / SAELENS_WEIGHTS
    elif (folder / SPARSIFY_WEIGHTS).is_file():
        fmt, weights = "sparsify", folder / SPARSIFY_WEIGHTS
    else:
        inside = sorted(p.parent.name for p in folder.glob(f"*/{SAELENS_WEIGHTS}")) + sorted(p.parent.name for p in folder.glob(f"*/{SPARSIFY_WEIGHTS}"))
        hint = f" It holds SAEs in {', '.join(inside)}: name one of those folders." if inside else ""
        raise ClipScopeError(f"{folder} holds neither {SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} (sparsify).{hint}")
    if not (folder / "cfg.json").is_file():
        raise ClipScopeError(f"{folder} has {weights.name} but no cfg.json beside it.")
    cfg = read_json(folder / "cfg.json")
    k, layer = (_saelens_k_and_layer if fmt == "saelens" else _sparsify_k_and_layer)(folder, cfg)
    with safe_open(str(weights), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    if fmt == "sparsify" and "W_skip" in shapes:
        raise ClipScopeError(f"{folder} is a sparsify coder with a skip connection (W_skip): ClipScope reads plain TopK SAEs.")
    names = TENSORS[fmt]
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ClipScopeError(f"{weights} lacks {', '.join(missing)} (it holds {', '.join(sorted(shapes)) or 'nothing'}).")
    enc, b_enc, W_dec, b_dec = (shapes[n] for n in names)
    d_sae, d_in = (enc[::-1] if fmt == "saelens" else enc) if len(enc) == 2 else (-1, -1)
    if (b_enc, W_dec, b_dec) != ((d_sae,), (d_sae, d_in), (d_in,)):
        raise ClipScopeError(f"{folder}: the tensors' shapes do not make one SAE: {dict(zip(names, (enc, b_enc, W_dec, b_dec)))}.")
    if not 1 <= k <= d_sae:
        raise ClipScopeError(f"{folder}: k = {k} is outside 1..{d_sae}, its number of latents.")
    return ExternalSAE(folder, fmt, weights, cfg, d_in, d_sae, k, layer)


def read_external_sae(folder: Path) -> tuple[TopKSAE, dict[str, Any]]:
    """The SAE in ``folder`` (eval mode, fp32, CPU) and what is known of it: ``format``, ``source``,
    ``sha256`` (of its weights file), ``layer`` (see :class:`ExternalSAE`)."""
    found = inspect_external_sae(folder)
    info = {"format": found.format, "source": str(found.folder.resolve()), "sha256": file_sha256(found.weights), "layer": found.layer}
    return load_external_sae(found), info


def load_external_sae(found: ExternalSAE) -> TopKSAE:
    """The inspected SAE's tensors as a :class:`TopKSAE` (eval mode, fp32, CPU) that computes what it computes."""
    tensors = load_file(str(found.weights))
    enc, b_enc, W_dec, b_dec = (tensors[n].float() for n in TENSORS[found.format])
    if found.format == "saelens":
        if not found.cfg.get("apply_b_dec_to_input", True):  # it encodes x, ClipScope encodes x - b_dec: move b_dec W_enc into b_enc
            b_enc = b_enc + b_dec @ enc
        enc = enc.T
    sae = TopKSAE(found.d_in, found.d_sae, found.k, use_b_dec=bool(b_dec.any()))
    with torch.no_grad():
        for param, value in ((sae.encoder_weight, enc), (sae.b_enc, b_enc), (sae.W_dec, W_dec), (sae.b_dec, b_dec)):
            param.copy_(value)
    return sae.eval()


def _saelens_k_and_layer(folder: Path, cfg: dict[str, Any]) -> tuple[int, int | None]:
    topk = "topk" in (cfg.get("architecture"), cfg.get("activation_fn_str"))
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if not topk or k is None:
        kind = cfg.get("architecture") or cfg.get("activation_fn_str") or "unnamed"
        raise ClipScopeError(f"{folder / 'cfg.json'} describes a{'' if topk else ' ' + repr(kind)} SAE without a TopK k: ClipScope reads TopK SAEs only.")
    scaling = cfg.get("normalize_activations") or "none"
    if scaling != "none":
        raise ClipScopeError(
            f"{folder / 'cfg.json'}: normalize_activations = {scaling!r}; ClipScope feeds SAEs the residual stream unscaled, "
            "so an SAE trained on rescaled inputs would read the wrong magnitudes."
        )
    for option in ("rescale_acts_by_decoder_norm", "finetuning_scaling_factor"):
        if cfg.get(option):
            raise ClipScopeError(f"{folder / 'cfg.json'}: {option} is on; ClipScope computes plain TopK SAEs and would read it wrongly.")
    if (cfg.get("reshape_activations") or "none") != "none":
        raise ClipScopeError(f"{folder / 'cfg.json'}: reshape_activations = {cfg['reshape_activations']!r}; ClipScope feeds SAEs one residual vector per token.")
    hook = cfg.get("hook_name") or cfg.get("hook_point") or (cfg.get("metadata") or {}).get("hook_name")
    layer = _layer_of(hook)
    if hook and layer is None:
        raise ClipScopeError(f"{folder / 'cfg.json'}: the SAE reads {hook!r}; ClipScope feeds SAEs the residual stream after a block (blocks.L.hook_resid_post).")
    return int(k), layer


def _sparsify_k_and_layer(folder: Path, cfg: dict[str, Any]) -> tuple[int, int | None]:
    for option, what in (("transcode", "a transcoder"), ("skip_connection", "a skip connection"), ("embed_skip", "an embedding skip"),
                         ("gram_lookup", "an n-gram lookup")):
        if cfg.get(option):
            raise ClipScopeError(f"{folder} is a sparsify coder with {what} ({option}): ClipScope reads plain TopK SAEs.")
    if cfg.get("activation", "topk") != "topk":
        raise ClipScopeError(f"{folder / 'cfg.json'}: activation = {cfg['activation']!r}; ClipScope reads TopK SAEs only.")
    if cfg.get("k") is None:
        raise ClipScopeError(f"{folder / 'cfg.json'} has no k: not a sparsify TopK SAE.")
    return int(cfg["k"]), None  # sparsify names the hook by its folder, in the trained model's own module names


def _layer_of(hook: str | None) -> int | None:
    """The block whose output a TransformerLens-style hook reads: ``blocks.L.hook_resid_post`` is block L's,
    ``blocks.L.hook_resid_pre`` block L-1's; None for any other hook or none."""
    match = _RESID.match(hook or "")
    if match is None:
        return None
    block = int(match.group(1))
    return block if match.group(2) == "post" else block - 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
