"""Zero-shot classifiers from class names and prompt templates, top-k accuracy, and the loss measures of a splice."""

from __future__ import annotations

from typing import Sequence

import torch

from clipscope.clip import cpu_blocks

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
        encoder, tokenizer=open_clip.get_tokenizer(model_name), classnames=list(class_names), templates=list(templates), device=device,
        num_classes_per_batch=max(1, _PROMPTS_PER_CALL // len(templates)),
    )


_PROMPTS_PER_CALL = 512
"""About how many prompts (classes x templates) one call of the text tower encodes: open_clip's default
of 10 classes a call gives a concept vocabulary's 3 templates calls of 30 prompts, too few to group
by length (docs/benchmarks.md)."""
_PASS_TOKENS = 16
"""On the CPU, the prompts of one length share a longer prompts' pass of the text tower when the
padding that adds is at most this many tokens: a pass costs about what ~18 tokens do (2 threads,
docs/benchmarks.md), so a concept's three templates run together and a classifier's 180 prompts
in a pass per length. Elsewhere (a GPU, where a token costs little beside a pass) every prompt of
a call shares one pass."""


class TrimmedPrompts:
    """``model.encode_text`` run over the prompts' own lengths instead of the full context (77 tokens).

    Exact for open_clip's ``CLIP`` text tower (:meth:`exact_for`): its attention is causal, so no
    position sees the padding after it, and it pools at the end-of-text token (the largest id). The
    prompts run in passes of similar length (:data:`_PASS_TOKENS`), each over its longest prompt, and
    on the CPU the last block computes the end-of-text tokens alone (``cpu_blocks.one_token_applies``).
    The CIFAR templates are at most ~15 tokens: building the classifier of 30 classes x 18 templates
    on 2 CPU cores took 22 s over 77 tokens, 3 s over the longest prompt of a call; the passes by
    length and the one-token last block then took classifiers 1.3x and the naming vocabulary's
    embeddings 1.6x faster (docs/benchmarks.md).
    """

    def __init__(self, model):
        self.model = model

    @staticmethod
    def exact_for(model) -> bool:
        from open_clip.model import CLIP

        return isinstance(model, CLIP) and model.text_pool_type == "argmax" and model.attn_mask is not None

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        m = self.model
        ends = text.argmax(dim=-1)
        order = ends.argsort(descending=True, stable=True)
        pooled = [self._pooled(text[rows, : int(ends[rows[0]]) + 1], ends[rows]) for rows in order.split(_passes(ends[order]))]
        x = torch.cat(pooled)[order.argsort()]
        x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    def _pooled(self, text: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """``ln_final`` of the tower's output at each prompt's end-of-text token (``ends``)."""
        m, length = self.model, text.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(text).to(cast) + m.positional_embedding[:length].to(cast)
        mask, blocks = m.attn_mask[:length, :length], m.transformer.resblocks
        if m.transformer.batch_first and not m.transformer.grad_checkpointing and cpu_blocks.one_token_applies(blocks[-1], x):
            for block in blocks[:-1]:
                x = block(x, attn_mask=mask)
            return m.ln_final(cpu_blocks.forward(blocks[-1], x, mask, token=ends)[:, 0])
        return m.ln_final(m.transformer(x, attn_mask=mask)[torch.arange(len(ends), device=x.device), ends])


def _passes(ends: torch.Tensor) -> list[int]:
    """The sizes of the passes over prompts sorted longest first (``ends``, their end-of-text positions):
    on the CPU, the prompts of one length join the pass of the longer ones before them when the
    padding that adds is within :data:`_PASS_TOKENS`, else start their own; elsewhere one pass."""
    if ends.device.type != "cpu":
        return [len(ends)]
    positions, counts = torch.unique_consecutive(ends, return_counts=True)
    sizes: list[int] = []
    longest = 0
    for end, count in zip(positions.tolist(), counts.tolist()):
        if sizes and count * (longest - end) <= _PASS_TOKENS:
            sizes[-1] += count
        else:
            sizes.append(count)
            longest = end
    return sizes


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
