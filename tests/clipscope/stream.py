"""Helpers for the tests that edit CLIP's residual stream: a small SAE that fires on random CLIP's
stream, and the whole model's zero-shot logits with the stream edited by a forward hook (an
independent path from ``clipscope.clip.hooks.continue_from``)."""

import torch

from clipscope.clip.hooks import token_slice
from clipscope.sae.model import TopKSAE

LAYER = 10
CLASSES = ["a", "b", "c", "d", "e"]


def sae_for(seed: int = 0) -> TopKSAE:
    sae = TopKSAE(768, 512, 16)
    sae.init_weights("tied", generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # enough latents fire on random CLIP's stream
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return sae


def hooked_logits(model, image, classifier, tokens: str, remove: torch.Tensor | None = None) -> torch.Tensor:
    """``[classes]`` zero-shot logits of the whole model, ``remove`` ``[tokens, width]`` subtracted
    from the residual stream after block LAYER at the SAE's tokens."""
    def edit(_module, _args, out):
        if remove is None:
            return out
        out = out.clone()
        out[:, token_slice(tokens)] -= remove[None].to(out)  # open_clip's blocks are batch-first
        return out

    handle = model.visual.transformer.resblocks[LAYER].register_forward_hook(edit)
    try:
        with torch.no_grad():
            emb = model.encode_image(image, normalize=True)
    finally:
        handle.remove()
    return (model.logit_scale.exp() * emb @ classifier)[0]
