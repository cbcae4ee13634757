"""The run configuration schema: one TOML file describes a whole pipeline run.

Every knob is a typed field with its default and a one-line description; ``configs/seed.toml``
reproduces the study and ``configs/demo.toml`` runs offline in minutes. Unknown keys are errors,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from clipscope.errors import ClipScopeError, validation_reason

DatasetName = Literal["food101", "cifar10", "cifar100", "imagefolder", "synthetic"]


def _each_with_a_slot(templates: list[str]) -> list[str]:
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every prompt template needs a '{}' where the name goes")
    return templates


PromptTemplates = Annotated[list[str], AfterValidator(_each_with_a_slot)]
"""Prompt templates given as a list: at least one, each with ``{}`` for the class or concept name."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which CLIP, which weights, and where the SAE reads from it."""

    name: str = Field("ViT-B-32", description="open_clip architecture name.")
    pretrained: str = Field(
        "laion2b_s34b_b79k",
        description="open_clip pretrained tag, or 'none' for random-initialised weights "
        "(allowed, but flagged as such on every artifact and page).",
    )
    weights_file: Path | None = Field(
        None,
        description="Local open_clip weights file (.bin/.pt/.safetensors); used instead of "
        "downloading the pretrained tag.",
    )
    init_seed: int = Field(0, description="Torch seed of the random initialisation when pretrained = 'none'.")
    layer: int = Field(
        10, ge=0, description="0-based residual block whose output is hooked (10 = the 11th of 12)."
    )
    tokens: Literal["cls", "patches", "all"] = Field(
        "cls", description="Which token positions become SAE inputs: CLS only, the patches, or all."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast precision of the CLIP forward pass (bf16/fp16 only on GPU)."
    )
    resize: Literal["pil", "torch"] = Field(
        "pil",
        description="Who resizes and crops the images. 'pil': open_clip's own preprocessing, in the image-decoding "
        "workers (exact). 'torch': the same antialiased resize and crop done by torchvision on the compute device, "
        "so on a GPU the workers only decode (about a third of their CPU time per image): 98 % of pixels equal to "
        "PIL's, none more than two levels apart, and a cache of its own. On a CPU-only machine 'pil' is faster (the workers resize in parallel).",
    )

    @property
    def is_random(self) -> bool:
        return self.weights_file is None and self.pretrained.lower() == "none"

    @model_validator(mode="after")
    def _hook_site_exists(self) -> ModelConfig:
        """The architecture is one of open_clip's vision transformers and ``layer`` one of its blocks, read
        from open_clip's architecture table (no weights): a typo fails here, before a stage downloads
        weights or a dataset."""
        import open_clip

        vision = (open_clip.get_model_config(self.name) or {}).get("vision_cfg")
        if vision is None:
            raise ValueError(f"name {self.name!r} is not an open_clip architecture (open_clip.list_models() lists them)")
        layers = vision.get("layers")
        if not isinstance(layers, int) or "patch_size" not in vision:
            raise ValueError(f"name {self.name!r} is not a vision transformer: ClipScope hooks a ViT's residual stream")
        if self.layer >= layers:
            raise ValueError(f"layer {self.layer} is outside 0..{layers - 1}, the blocks of {self.name}")
        return self


class DatasetSpec(_Strict):
    """A set of images: which dataset, which split, and which subset of it."""

    name: DatasetName = Field(
        "synthetic",
        description="Dataset kind. 'imagefolder': every image under root (.jpg .jpeg .png .webp .bmp .gif .tif .tiff), "
        "its class the first-level folder, hidden files and folders (a leading dot) skipped.",
    )
    split: str = Field("train", description="'train' or 'test' ('test' is Food-101's and CIFAR's evaluation split).")
    root: Path | None = Field(
        None,
        description="Folder of the data; default <data_dir>/datasets/<name>. Required for imagefolder.",
    )
    subsample: int | None = Field(
        None, ge=1, description="Keep a seeded random subset of this many images (sorted by index)."
    )
    limit: int | None = Field(None, ge=1, description="Keep only the first this many images (after subsample).")
    seed: int = Field(0, description="Seed of the subsample (and of the synthetic generator).")
    synthetic_size: int = Field(
        2000, ge=1, description="synthetic only: number of images in the split."
    )
    image_size: int = Field(224, ge=16, description="synthetic only: side of the generated images in pixels.")

    @model_validator(mode="after")
    def _check(self) -> "DatasetSpec":
        if self.name == "imagefolder" and self.root is None:
            raise ValueError("dataset 'imagefolder' needs root = '<folder of images>'")
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {self.split!r}")
        return self


class ExtractConfig(_Strict):
    """How activations are extracted into the cache."""

    batch_size: int = Field(128, ge=1, description="Images per CLIP forward pass.")
    flush_every: int = Field(
        2048, ge=1, description="Images between durable progress records (the resume granularity)."
    )


class SAEConfig(_Strict):
    """The sparse autoencoder's shape, or the folder of one trained elsewhere."""

    d_sae: int = Field(49152, ge=1, description="Number of latents (dictionary size; 64 x 768 in the study).")
    k: int = Field(500, ge=1, description="Latents kept per input by TopK.")
    use_b_dec: bool | None = Field(
        None,
        description="Learn a pre-encoder bias b_dec (subtracted before encoding, added after "
        "decoding); default: off for the seed recipe, on for topk.",
    )
    import_from: Path | None = Field(
        None,
        description="The folder of a TopK SAE trained elsewhere on this model's residual stream after model.layer: SAELens "
        "(cfg.json + sae_weights.safetensors) or EleutherAI sparsify (cfg.json + sae.safetensors). It is imported instead "
        "of trained (its own d_sae and k replace the two above; train only says where its held-out metrics are measured), "
        "then evaluated and precomputed like a trained SAE.",
    )

    @model_validator(mode="after")
    def _check(self) -> "SAEConfig":
        if self.k > self.d_sae:
            raise ValueError(f"k = {self.k} exceeds d_sae = {self.d_sae}")
        return self


class TrainConfig(_Strict):
    """How the SAE is trained; fields marked 'seed' or 'topk' apply to that recipe only."""

    recipe: Literal["seed", "topk"] = Field("topk", description="'seed' = the study to the letter; 'topk' = current practice.")
    epochs: float = Field(15, gt=0, description="Passes over the training activations.")
    batch_size: int = Field(64, ge=1, description="Activation vectors per step.")
    lr: float | None = Field(
        None,
        gt=0,
        description="Adam learning rate; default seed 1e-3 (the report gives none: Adam's default), "
        "topk 2e-4 / sqrt(d_sae / 2^14) (Gao et al. 2024 scaling).",
    )
    seed: int = Field(0, description="Seed of the initialisation and of the data order.")
    l1_start: float = Field(1e-6, ge=0, description="seed: L1 coefficient at step 0.")
    l1_end: float = Field(0.01, ge=0, description="seed: L1 coefficient after the warm-up.")
    l1_warmup_steps: int = Field(12000, ge=0, description="seed: steps of the linear L1 warm-up.")
    b_dec_init: Literal["mean", "median", "zeros"] = Field(
        "mean", description="topk: initial b_dec: data mean, geometric median, or zeros."
    )
    auxk_coef: float = Field(1 / 32, ge=0, description="topk: weight of the AuxK loss on dead latents.")
    auxk_k: int | None = Field(None, ge=1, description="topk: latents AuxK may use; default d_in / 2.")
    dead_after: int | None = Field(
        None,
        ge=1,
        description="Samples without firing after which a latent counts as dead; default "
        "min(10M, training samples / 10), so short runs get a proportionate threshold.",
    )
    lr_warmup_steps: int | None = Field(
        None, ge=0, description="topk: linear LR warm-up steps; default min(1000, 5 % of the steps)."
    )
    lr_decay_fraction: float = Field(
        0.2, ge=0, le=1, description="topk: final fraction of steps over which the LR decays linearly to 0."
    )
    holdout_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of the training images held out for metrics when no eval_data is given.",
    )
    eval_data: DatasetSpec | None = Field(
        None, description="Separate image set for held-out metrics (then no training image is held out)."
    )
    eval_max_samples: int = Field(20000, ge=1, description="At most this many held-out vectors per metrics pass.")
    eval_every: int = Field(1000, ge=1, description="Steps between held-out EVR measurements on the curve.")
    log_every: int = Field(100, ge=1, description="Steps between training-curve points (console + database).")
    checkpoint_every: int = Field(1000, ge=1, description="Steps between resumable checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")
    resident: bool = Field(
        True,
        description="Copy all training activations (fp16) to the training device once; false gathers "
        "each batch from the memory-mapped cache instead.",
    )

    @model_validator(mode="after")
    def _something_held_out(self) -> TrainConfig:
        """Held-out metrics need images: a share of the training set, or a set of their own."""
        if self.holdout_fraction == 0 and self.eval_data is None:
            raise ValueError("no held-out data: set holdout_fraction > 0 or eval_data")
        return self


def _default_eval_sets() -> list["DatasetSpec"]:
    return [DatasetSpec(name="cifar10", split="test"), DatasetSpec(name="cifar100", split="test")]


class EvaluateConfig(_Strict):
    """Zero-shot evaluation with the SAE spliced into CLIP."""

    datasets: list[DatasetSpec] = Field(
        default_factory=_default_eval_sets, description="Labelled image sets (default: the CIFAR-10 and CIFAR-100 test sets)."
    )
    templates: Literal["clip_cifar", "openai_imagenet", "simple_imagenet"] | PromptTemplates = Field(
        "clip_cifar",
        description="Prompt templates: 'clip_cifar' (CLIP's 18), 'openai_imagenet' (80), 'simple_imagenet', or a list with '{}'.",
    )

    batch_size: int = Field(128, ge=1, description="Images per forward pass.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast precision on GPU; keep fp32 unless measured to move accuracy by < 0.1 pp."
    )


class NamingConfig(_Strict):
    """Automatic feature names and coherence scores from CLIP's image-text space (clipscope/naming.py)."""

    enabled: bool = Field(
        True,
        description="Embed the precompute images with the full CLIP, then give each feature the vocabulary concept its "
        "top images match best beyond the average image, and its coherence (how alike CLIP finds its top images). "
        "Costs one CLIP forward pass over the precompute set (cached beside its activations) and the vocabulary's text encoding.",
    )
    vocabulary: str | list[str] = Field(
        "builtin",
        description="Candidate names: 'builtin' (about 530 visual concepts: colours, textures, materials, shapes, scenes, "
        "animals, people, dishes, objects, text and art; clipscope/vocabularies/visual-concepts.txt), a text file "
        "with one concept per line ('#' comments), or a list.",
    )
    dataset_classes: bool = Field(True, description="Add the precompute dataset's class names (Food-101's dishes, CIFAR's classes...) to the candidates.")
    templates: PromptTemplates = Field(
        ["a photo of {}.", "a close-up photo of {}.", "{}."],
        description="Prompt templates each concept is encoded with ('{}' = the concept); the embeddings are averaged.",
    )
    candidates: int = Field(3, ge=1, le=20, description="Best concepts kept per feature, with their scores.")
    batch_size: int = Field(128, ge=1, description="Images per CLIP forward pass while embedding the precompute set.")

    @model_validator(mode="after")
    def _vocabulary_file_exists(self):
        """A vocabulary file that is not there fails when the config is read, not after training."""
        if self.enabled and isinstance(self.vocabulary, str) and self.vocabulary != "builtin":
            if not Path(self.vocabulary).expanduser().is_file():
                raise ValueError(f"vocabulary file {self.vocabulary} does not exist (use 'builtin', a text file with one concept per line, or a list)")
        return self


class PrecomputeConfig(_Strict):
    """Per-feature statistics, examples and neighbours written to the database for the explorer."""

    data: DatasetSpec | None = Field(
        None,
        description="Images to rank features over; default: a seeded 5,000-image subsample of the training "
        "dataset, as in the study.",
    )
    default_subsample: int = Field(5000, ge=1, description="Size of the default subsample of the training dataset.")
    top_k: int = Field(12, ge=1, description="Top examples kept per feature (the study's 4 x 3 collage).")
    intervals: int = Field(5, ge=0, description="Equal-width activation intervals in (0, max] sampled below the top.")
    per_interval: int = Field(4, ge=1, description="Examples sampled from each interval.")
    histogram_bins: int = Field(24, ge=2, description="Log-spaced histogram bins from max / histogram_range to max.")
    histogram_range: float = Field(1000.0, gt=1, description="Ratio between the histogram's last and first edge.")
    dense_threshold: float = Field(0.1, gt=0, le=1, description="Features firing on more than this share of images are flagged dense.")
    neighbours: int = Field(10, ge=0, description="Nearest features by decoder cosine similarity.")
    top_classes: int = Field(
        5, ge=0, le=100,
        description="Dataset classes listed per feature: those holding most of the images it fires on, each with "
        "its share of them and the share of the class's images it fires on (0 = none; unlabelled images count in no class).",
    )
    names: NamingConfig = Field(default_factory=NamingConfig, description="Automatic names and coherence scores.")
    thumbnail_size: int = Field(160, ge=16, description="Side of the square WebP thumbnails (centre crop, as CLIP sees the image).")
    batch_size: int = Field(512, ge=1, description="Activation vectors encoded per batch (bounds the memory).")
    seed: int = Field(0, description="Seed of the interval sampling.")
    overlaps: bool = Field(
        True,
        description="Then measure how many of its features each other ready SAE at the same hook site has too, and the "
        "reverse (one decoder product per pair: about 22 s a pair of 49,152-latent SAEs on 2 CPU cores, by estimate under a second "
        "on a GPU). Off, `clipscope saes overlaps` measures them later. Changes nothing the precompute writes, so "
        "it does not redo a finished precompute.",
    )


class RunConfig(_Strict):
    """A whole pipeline run."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Name of the SAE (part of its folder name).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="CLIP and the hook site.")
    data: DatasetSpec = Field(default_factory=DatasetSpec, description="Training images.")
    extract: ExtractConfig = Field(default_factory=ExtractConfig, description="Extraction settings.")
    sae: SAEConfig = Field(default_factory=SAEConfig, description="SAE shape, or one to import.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training recipe.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Zero-shot evaluation.")
    precompute: PrecomputeConfig = Field(default_factory=PrecomputeConfig, description="Feature precompute for the explorer.")

    @property
    def precompute_data(self) -> DatasetSpec:
        """The precompute image set: as configured, or the training set subsampled."""
        if self.precompute.data is not None:
            return self.precompute.data
        return self.data.model_copy(update={"subsample": self.precompute.default_subsample, "limit": None})

    @property
    def use_b_dec(self) -> bool:
        if self.sae.use_b_dec is not None:
            return self.sae.use_b_dec
        return self.train.recipe == "topk"

    @model_validator(mode="after")
    def _import_fits_the_hook_site(self) -> RunConfig:
        """An SAE to import is inspected (its cfg.json and its weights' header) when the config is read: one of
        another kind, width or block fails here, before extraction spends minutes."""
        if self.sae.import_from is None:
            return self
        import open_clip

        from clipscope.sae.external import inspect_external_sae

        try:
            found = inspect_external_sae(self.sae.import_from)
        except ClipScopeError as exc:
            raise ValueError(f"sae.import_from: {exc}") from None
        width = open_clip.get_model_config(self.model.name)["vision_cfg"]["width"]
        if found.d_in != width:
            raise ValueError(f"sae.import_from: {found.folder} reads {found.d_in}-dimensional inputs; the residual stream of {self.model.name} has {width}")
        if found.layer is not None and found.layer != self.model.layer:
            raise ValueError(
                f"sae.import_from: {found.folder} was trained on the residual stream after block {found.layer}; model.layer = "
                f"{self.model.layer} hooks block {self.model.layer}"
            )
        return self


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read and validate a TOML run config, with ``overrides`` (``KEY=VALUE``, :func:`apply_overrides`)
    applied first; errors name the file and the offending key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ClipScopeError(f"Config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ClipScopeError(f"Config file {path} is not valid TOML: {exc}.") from None
    source = str(path) + "".join(f" --set {o}" for o in overrides)
    return parse_config(apply_overrides(raw, overrides), source=source)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` with each ``KEY=VALUE`` of ``overrides`` set, in order: ``KEY`` is a dotted path of tables
    (``sae.k``; missing tables are made), ``VALUE`` a TOML value (``64``, ``1e-3``, ``true``,
    ``["a photo of a {}."]``, ``{name = "cifar10"}``) or else the text itself (``data.root=/data/food``).
    A list is set whole. The result is validated like the file: an unknown key is an error."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ClipScopeError(f"--set {item!r} is not KEY=VALUE with a dotted KEY, e.g. --set sae.k=64.")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        table = out
        for depth, part in enumerate(p.strip() for p in parts[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ClipScopeError(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is not a table; set it whole.")
        table[parts[-1].strip()] = value
    return out


def parse_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {validation_reason(err)}" for err in exc.errors()
        )
        raise ClipScopeError(f"Config {source} is invalid: {problems}.") from None


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hex digest of a JSON-able object, independent of key order."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
