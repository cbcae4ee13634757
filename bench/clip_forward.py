"""CLIP ViT-B/32 on the CPU: its blocks and patch embedding with their products through oneDNN
(``clipscope/clip/cpu_blocks.py``, what ClipScope runs) against the same modules run as open_clip's
(torch's own path: MKL's products, the fused attention kernel, ``conv2d``), alternately in the same
process on the same inputs. The image tower to block 10 at batch 1 (an analysed upload) and at
extraction's batches; the rest of it from block 10 (where ClipScope's last block computes the CLS
token alone) for 24 streams, as an explanation measures its features, and for 24 copies of one stream
edited at the CLS token (a CLS SAE's measured features), whose last block computes the other tokens'
keys and values once (``shared_rest``) against for every copy; the text tower building a
zero-shot classifier (CLIP's 18 CIFAR templates per class, as an explained prediction's first
request or the evaluation does). Then the text tower's prompts in passes by length with a one-token
last block (``zeroshot.TrimmedPrompts``) against one pass per call of open_clip's 10 classes over
its longest prompt: CIFAR-10's classifier and the naming's vocabulary (3 templates). Prints ms per
call, the ratio, and the largest difference between the two outputs."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipscope import gemm  # noqa: E402
from clipscope.clip import cpu_blocks  # noqa: E402
from clipscope.clip.hooks import continue_from, residual_at  # noqa: E402
from clipscope.clip.loading import load_clip  # noqa: E402
from clipscope.clip import zeroshot  # noqa: E402
from clipscope.clip.zeroshot import CLIP_CIFAR_TEMPLATES, build_classifier  # noqa: E402
from clipscope.config import ModelConfig, NamingConfig  # noqa: E402
from clipscope.naming import read_vocabulary  # noqa: E402
from serve import CIFAR10  # noqa: E402  (bench/serve.py's ten classes)


def compare(run, rounds: int, seconds: float, reference: dict | None = None) -> dict[str, float]:
    """Times ``run()`` with the blocks as modules and through :mod:`cpu_blocks`, alternately; or, with a
    ``reference`` (``{(module, attribute): value}``), with those attributes set and as ClipScope runs."""
    rules = ("applies", "one_token_applies", "_patches_apply")
    if reference is None:
        reference = {(cpu_blocks, rule): (lambda module, x: False) for rule in rules}
    ours = {key: getattr(*key) for key in reference}
    sides = {"reference": reference, "clipscope": ours}

    def take(side: str) -> None:
        for (module, attribute), value in sides[side].items():
            setattr(module, attribute, value)

    try:
        outputs, first = {}, {}
        for name in sides:
            take(name)
            started = time.perf_counter()
            outputs[name] = run()  # also the warm-up
            first[name] = time.perf_counter() - started
        repeats = max(1, round(seconds / max(first.values())))
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(rounds):
            for name in sides:
                take(name)
                started = time.perf_counter()
                for _ in range(repeats):
                    run()
                times[name].append((time.perf_counter() - started) / repeats)
    finally:
        take("clipscope")
    theirs, ours_s = statistics.median(times["reference"]), statistics.median(times["clipscope"])
    return {"reference_ms": theirs * 1e3, "clipscope_ms": ours_s * 1e3, "speedup": theirs / ours_s,
            "max_abs_difference": (outputs["reference"] - outputs["clipscope"]).abs().max().item(),
            "output_max_abs": outputs["reference"].abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="image batches")
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--rest", type=int, default=24, help="streams run from the hook site to the embedding (0: none)")
    parser.add_argument("--classes", type=int, default=10, help="classes of the zero-shot classifier (0: no text tower)")
    parser.add_argument("--concepts", type=int, default=528, help="concepts of the built-in vocabulary encoded as the naming does")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    parser.add_argument("--seconds", type=float, default=2.0, help="about how long each side runs per round")
    a = parser.parse_args()
    clip = load_clip(ModelConfig(pretrained="none"), "cpu")
    results, forward = {}, cpu_blocks.forward
    with torch.inference_mode():
        for batch in a.batches:
            images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
            row = compare(lambda: residual_at(clip.visual, images, a.layer), a.rounds, a.seconds)
            results[f"image_batch_{batch}"] = {**row, "clipscope_images_per_s": batch / row["clipscope_ms"] * 1e3}
        if a.rest:  # the tower after the hook site, as an explanation runs it for the features it measures
            stream = torch.randn(a.rest, 50, 768, generator=torch.Generator().manual_seed(0))
            results[f"rest_of_tower_batch_{a.rest}"] = compare(lambda: continue_from(clip.visual, stream, a.layer), a.rounds, a.seconds)
            copies = stream[:1].repeat(a.rest, 1, 1)  # one stream, each copy edited at the CLS token alone (a CLS SAE's measured features)
            copies[:, 0] += torch.randn(a.rest, 768, generator=torch.Generator().manual_seed(1))
            whole = {(cpu_blocks, "forward"): lambda block, x, *args, shared_rest=False, **kw: forward(block, x, *args, **kw)}
            results[f"rest_of_tower_cls_copies_{a.rest}"] = compare(
                lambda: continue_from(clip.visual, copies, a.layer, edited_at=slice(0, 1)), a.rounds, a.seconds, whole)
        if a.classes:
            names = [f"class number {i}" for i in range(a.classes)]
            classifier = lambda: build_classifier(clip.model, "ViT-B-32", names, CLIP_CIFAR_TEMPLATES, "cpu")  # noqa: E731
            results[f"text_classifier_{a.classes}_classes"] = compare(classifier, a.rounds, a.seconds)
            concepts = read_vocabulary("builtin")[: a.concepts]
            one_pass = {(zeroshot, "_PASS_TOKENS"): 10**9, (cpu_blocks, "one_token_applies"): lambda block, x: False}
            for name, run, templates in (("text_classifier_cifar10", lambda: build_classifier(
                    clip.model, "ViT-B-32", CIFAR10, CLIP_CIFAR_TEMPLATES, "cpu"), CLIP_CIFAR_TEMPLATES),
                    (f"text_vocabulary_{len(concepts)}_concepts", lambda: build_classifier(
                        clip.model, "ViT-B-32", concepts, NamingConfig().templates, "cpu"), NamingConfig().templates)):
                reference = {**one_pass, (zeroshot, "_PROMPTS_PER_CALL"): 10 * len(templates)}  # open_clip's 10 classes a call
                results[f"{name}_by_length"] = compare(run, a.rounds, a.seconds, reference)
    print(json.dumps({
        "shape": f"ViT-B-32 (random init), image tower to block {a.layer}, CPU, {torch.get_num_threads()} threads, kernel {gemm.cpu_kernel()}",
        **results,
    }, indent=2))


if __name__ == "__main__":
    main()
