"""Zero-shot classifiers from class names and prompt templates, top-k accuracy, and the loss measures of a splice."""

from __future__ import annotations

from typing import Any, Sequence

import torch

# The 18 templates CLIP (Radford et al. 2021) used for CIFAR-10 and CIFAR-100.
CLIP_CIFAR_TEMPLATES = tuple(
    f"a {quality}photo of {article} {size}{{}}."
    for article in ("a", "the")
    for quality, size in (
        ("", ""),
        ("blurry ", ""),
        ("black and white ", ""),
        ("low contrast ", ""),
        ("high contrast ", ""),
        ("bad ", ""),
        ("good ", ""),
        ("", "small "),
        ("", "big "),
    )
)


def template_set(spec: str | Sequence[str]) -> tuple[str, list[str]]:
    """(name, templates) for a named set or an explicit list of ``{}`` templates."""
    if not isinstance(spec, str):
        templates = list(spec)
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("every prompt template needs a '{}' for the class name")
        return "custom:" + "|".join(templates), templates
    if spec == "clip_cifar":
        return spec, list(CLIP_CIFAR_TEMPLATES)
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    sets = {"openai_imagenet": OPENAI_IMAGENET_TEMPLATES, "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES}
    if spec not in sets:
        raise ValueError(f"unknown template set {spec!r}; known: clip_cifar, {', '.join(sets)}")
    return spec, [t("{}") for t in sets[spec]]


@torch.no_grad()
def build_classifier(model, model_name: str, class_names: Sequence[str], templates: Sequence[str], device) -> torch.Tensor:
    """``[embed_dim, n_classes]`` unit-norm class embeddings (mean over templates), open_clip's builder.

    The prompts are encoded over their own length where that is exact (:class:`TrimmedPrompts`).
    """
    import open_clip

    encoder = TrimmedPrompts(model) if TrimmedPrompts.exact_for(model) else model
    return open_clip.build_zero_shot_classifier(
        encoder, tokenizer=open_clip.get_tokenizer(model_name), classnames=list(class_names), templates=list(templates), device=device
    )


class TrimmedPrompts:
    """``model.encode_text`` run over the batch's longest prompt instead of the full context (77 tokens).

    Exact for open_clip's ``CLIP`` text tower (:meth:`exact_for`): its attention is causal, so no
    position sees the padding after it, and the pooled position (the end-of-text token, the largest
    id) lies within the longest prompt. The CIFAR templates are at most ~15 tokens: building the
    classifier of 30 classes x 18 templates on 2 CPU cores took 22 s over 77 tokens, 3 s trimmed.
    """

    def __init__(self, model):
        self.model = model

    @staticmethod
    def exact_for(model) -> bool:
        from open_clip.model import CLIP

        return isinstance(model, CLIP) and model.text_pool_type == "argmax" and model.attn_mask is not None

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        m = self.model
        length = int(text.argmax(dim=-1).max()) + 1
        text = text[:, :length]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(text).to(cast) + m.positional_embedding[:length].to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:length, :length]))
        x = text_global_pool(x, text, m.text_pool_type)
        x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def zero_shot_logits(model, image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Logits with the model's own learned temperature: ``exp(logit_scale) * cos(image, class)``."""
    feats = image_features / image_features.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * feats @ classifier


def correct_at_k(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many rows have their label among the top-k logits, for each k (capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: int(hits[:, : min(k, logits.shape[1])].any(dim=1).sum()) for k in ks}


def loss_sums(logits: torch.Tensor, clean_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Over a batch, the summed zero-shot cross-entropy of ``logits`` against ``labels`` and the summed
    KL divergence KL(clean || these) of the class distributions, in nats, as float64 tensors on the
    logits' device (no wait for it). The logits carry CLIP's learned scale (:func:`zero_shot_logits`):
    without it the softmax, and so both losses, would mean nothing."""
    logp, clean_logp = logits.double().log_softmax(dim=1), clean_logits.double().log_softmax(dim=1)
    cross_entropy = -logp.gather(1, labels[:, None]).sum()
    kl = (clean_logp.exp() * (clean_logp - logp)).sum()
    return cross_entropy, kl


def loss_recovered(clean: float | None, spliced: float | None, ablated: float | None) -> float | None:
    """The share of the loss that mean-ablating the site adds which the SAE's reconstruction takes back,
    ``(ablated - spliced) / (ablated - clean)``: 1 when splicing costs nothing, 0 when it is as bad as
    knowing only the mean (below 0 worse still). None without the three losses, or where ablating the
    site costs nothing (nothing to recover)."""
    if clean is None or spliced is None or ablated is None or ablated <= clean:
        return None
    return (ablated - spliced) / (ablated - clean)


def class_drops(by_condition: dict[str, dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Per class, top-1 accuracy clean and spliced, the drop in percentage points, what the spliced
    model most often mistakes the class for, and the features clean CLIP's recognition of it rests on
    most (first-order support, when tallied); the most hurt first. None for an evaluation without
    per-class tallies (made before they were kept)."""
    clean, spliced = by_condition.get("clean"), by_condition.get("spliced")
    if not clean or not spliced:
        return None
    names, supports = clean["classes"], clean.get("features")
    rows = []
    for i, (name, n) in enumerate(zip(names, clean["n"])):
        if not n:
            continue
        other, times = spliced["mistaken_for"][i]
        rows.append({
            "class": name, "n": n, "clean": clean["hits"][i] / n, "spliced": spliced["hits"][i] / n,
            "drop_pp": 100 * (clean["hits"][i] - spliced["hits"][i]) / n,
            "spliced_mistaken_for": {"class": names[other], "share": times / n} if other >= 0 else None,
            "features": [{"index": f, "support": v} for f, v in supports[i]] if supports else None,
        })
    return sorted(rows, key=lambda r: (-r["drop_pp"], r["class"]))
