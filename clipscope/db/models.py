"""The schema. Alembic revisions under ``migrations/`` must match it (a test checks for drift)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator):
    """A moment, stored in UTC and read back timezone-aware in UTC on every engine: SQLite keeps no
    offset and gave naive datetimes where PostgreSQL gave aware ones, so the API wrote times two ways."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"a naive datetime ({value}) is no moment: give it a timezone")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class SaeStatus:
    """Lifecycle of an SAE row. Only ``ready`` SAEs are shown as browsable."""

    TRAINING = "training"
    TRAINED = "trained"
    FAILED = "failed"
    READY = "ready"


class Sae(Base):
    __tablename__ = "saes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(128), unique=True, doc="Folder name under <data_dir>/saes: '<name>-<hash>'.")
    name: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=SaeStatus.TRAINING, index=True)
    model: Mapped[str] = mapped_column(String(64))
    pretrained: Mapped[str] = mapped_column(String(128), doc="open_clip tag, 'file', or 'none'.")
    random_weights: Mapped[bool] = mapped_column(Boolean, default=False)
    layer: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[str] = mapped_column(String(16))
    d_in: Mapped[int] = mapped_column(Integer)
    d_sae: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)
    recipe: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, doc="The full run config.")
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, doc="Weights source, dataset identity, cache names.")
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, doc="Final held-out metrics.")
    precompute: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, nullable=True, doc="What the committed precompute covered (image set, counts, key, seconds)."
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)

    curve: Mapped[list["TrainingPoint"]] = relationship(
        back_populates="sae", cascade="all, delete-orphan", order_by="TrainingPoint.step"
    )
    evaluations: Mapped[list["Evaluation"]] = relationship(back_populates="sae", cascade="all, delete-orphan")


class TrainingPoint(Base):
    """One point of the training curve, logged every ``train.log_every`` steps."""

    __tablename__ = "training_points"
    __table_args__ = (UniqueConstraint("sae_id", "step", name="uq_training_points_sae_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    samples: Mapped[int] = mapped_column(BigInteger, doc="Training vectors seen so far.")
    loss: Mapped[float] = mapped_column(Float, doc="Mean total loss over the logging window.")
    mse: Mapped[float] = mapped_column(Float, doc="Mean MSE over the logging window.")
    train_evr: Mapped[float] = mapped_column(Float, doc="EVR over the training batches of the window.")
    l0: Mapped[float] = mapped_column(Float)
    dead_fraction: Mapped[float] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    heldout_evr: Mapped[float | None] = mapped_column(Float, nullable=True, doc="Held-out EVR, at evaluation steps.")
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, doc="Recipe-specific terms (L1 coefficient, AuxK loss).")

    sae: Mapped[Sae] = relationship(back_populates="curve")


class Evaluation(Base):
    """Zero-shot accuracy of CLIP on one labelled image set under one splice condition."""

    __tablename__ = "evaluations"
    __table_args__ = (
        UniqueConstraint("sae_id", "dataset_key", "templates", "condition", name="uq_evaluations_run_condition"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), index=True)
    dataset: Mapped[str] = mapped_column(String(32), doc="Dataset name (cifar10, cifar100, synthetic, imagefolder, food101).")
    split: Mapped[str] = mapped_column(String(16))
    dataset_key: Mapped[str] = mapped_column(String(32), doc="Hash of the dataset's identity (subset, root).")
    n: Mapped[int] = mapped_column(Integer, doc="Images evaluated.")
    templates: Mapped[str] = mapped_column(String(512), doc="Prompt template set name.")
    n_templates: Mapped[int] = mapped_column(Integer)
    condition: Mapped[str] = mapped_column(String(16), doc="clean | spliced | spliced_error | mean_ablation.")
    top1: Mapped[float] = mapped_column(Float)
    top5: Mapped[float] = mapped_column(Float)
    details: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, nullable=True, doc="Splice check, precision, seconds; by_class: {classes, n, hits, mistaken_for} of this condition "
        "(per class: images, top-1 hits, and the wrong class predicted most often for it with how often)."
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    sae: Mapped[Sae] = relationship(back_populates="evaluations")


class SaeOverlap(Base):
    """How many of one SAE's live features another SAE at the same hook site has too, by the cosine of each
    one's dictionary atom to its best match among the other's live atoms (:mod:`clipscope.matching`).
    Written by the precompute for both directions of a pair; current while both precompute keys match."""

    __tablename__ = "sae_overlaps"
    __table_args__ = (UniqueConstraint("sae_id", "other_id", name="uq_sae_overlaps_pair"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), index=True, doc="The SAE whose features are matched.")
    other_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), index=True, doc="The SAE they are matched in.")
    versions: Mapped[dict[str, Any]] = mapped_column(JSON, doc="{sae, other}: the precompute keys of both when it was measured.")
    summary: Mapped[dict[str, Any]] = mapped_column(
        JSON, doc="{features, median, bins, counts, shared: {threshold: share}, chance}: clipscope.matching.overlap_summary."
    )
    best: Mapped[bytes] = mapped_column(
        LargeBinary, doc="float16 little-endian [the SAE's d_sae]: each feature's best cosine in the other SAE; NaN where it is not live."
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Image(Base):
    """An image some feature example points at; shared by every SAE over the same dataset."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("dataset_key", "index", name="uq_images_dataset_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset: Mapped[str] = mapped_column(String(32))
    split: Mapped[str] = mapped_column(String(16))
    dataset_key: Mapped[str] = mapped_column(String(32), doc="Hash of the base dataset's identity.")
    index: Mapped[int] = mapped_column(Integer, doc="Index of the image in its dataset.")
    label: Mapped[int] = mapped_column(Integer, doc="Class index, -1 when unlabelled.")
    class_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    content_hash: Mapped[str] = mapped_column(String(64), index=True, doc="sha256 of the decoded RGB pixels and size.")
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    thumbnail: Mapped[str] = mapped_column(String(256), doc="WebP thumbnail path relative to the data dir.")


class Feature(Base):
    """Per-feature statistics over the precompute image set."""

    __tablename__ = "features"
    __table_args__ = (
        Index("ix_features_sae_frequency", "sae_id", "frequency", "idx"),  # covering: pages are found in the index
        Index("ix_features_sae_max", "sae_id", "max_activation", "idx"),
        Index("ix_features_sae_flags", "sae_id", "is_dead", "is_dense"),
        Index("ix_features_sae_class_share", "sae_id", "top_class_share", "idx"),
        Index("ix_features_sae_coherence", "sae_id", "coherence", "idx"),
    )

    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    n_active: Mapped[int] = mapped_column(Integer, doc="Images on which the feature fires (> 0).")
    frequency: Mapped[float] = mapped_column(Float, doc="n_active / images.")
    mean_active: Mapped[float] = mapped_column(Float, doc="Mean activation over the images where it fires.")
    max_activation: Mapped[float] = mapped_column(Float)
    is_dead: Mapped[bool] = mapped_column(Boolean, doc="Never fires on the precompute set.")
    is_dense: Mapped[bool] = mapped_column(Boolean, doc="Fires on more than precompute.dense_threshold of images.")
    histogram: Mapped[dict[str, Any]] = mapped_column(JSON, doc="Log-spaced bins: edges, counts, and 'below' the first edge.")
    intervals: Mapped[list[Any]] = mapped_column(JSON, doc="[{lo, hi, count, share}] of the activation intervals sampled.")
    neighbours: Mapped[list[Any]] = mapped_column(
        JSON, doc="[[feature, cosine, its automatic name], ...] nearest by decoder direction (the name: null when it has none)."
    )
    top_class: Mapped[str | None] = mapped_column(String(128), nullable=True, doc="Name of the class holding most of the images it fires on.")
    top_class_share: Mapped[float | None] = mapped_column(Float, nullable=True, doc="That class's share of the images it fires on.")
    classes: Mapped[list[Any] | None] = mapped_column(
        JSON, nullable=True,
        doc="[{label, name, count, share, of_class, mean}, ...]: the dataset classes holding most of the images it fires on "
        "(share = of its firing images, of_class = of the class's images, mean = mean activation there); null without classes.",
    )
    auto_name: Mapped[str | None] = mapped_column(
        String(200), nullable=True, doc="Automatic name: the concept its top images match best beyond the average image (clipscope/naming.py); null when none scores above 0."
    )
    auto_score: Mapped[float | None] = mapped_column(Float, nullable=True, doc="That concept's score: mean cosine of the top images to it, minus the average image's.")
    auto_names: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True, doc="[{name, score}, ...]: the best concepts, best first.")
    output_names: Mapped[list[Any] | None] = mapped_column(
        JSON, nullable=True, doc="[{name, score}, ...]: the concepts its atom writes toward through the direct path to CLIP's "
        "image embedding (clipscope/naming.py), best first; null for patch-token SAEs and precomputes made before."
    )
    coherence: Mapped[float | None] = mapped_column(
        Float, nullable=True, doc="Mean CLIP cosine between two of its top images minus that between two images of the set; null below two top images."
    )


FEATURE_STATS = (
    Feature.idx, Feature.frequency, Feature.n_active, Feature.mean_active, Feature.max_activation, Feature.is_dead, Feature.is_dense,
    Feature.top_class, Feature.top_class_share, Feature.auto_name, Feature.auto_score, Feature.coherence,
)
"""What a table of features shows (the explorer's list and its CSV, the notebook's ``features()``): the
JSON columns (histogram, intervals, neighbours) stay unread."""
FEATURE_STAT_NAMES = tuple("index" if column.key == "idx" else column.key for column in FEATURE_STATS)
""":data:`FEATURE_STATS` as the API names them."""


class FeatureExample(Base):
    """One image of a feature's top examples (bucket -1) or of an interval sample (bucket = interval)."""

    __tablename__ = "feature_examples"
    __table_args__ = (
        ForeignKeyConstraint(["sae_id", "feature"], ["features.sae_id", "features.idx"], ondelete="CASCADE"),
        UniqueConstraint("sae_id", "feature", "bucket", "rank", name="uq_feature_examples_slot"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sae_id: Mapped[int] = mapped_column(Integer)
    feature: Mapped[int] = mapped_column(Integer)
    bucket: Mapped[int] = mapped_column(Integer, doc="-1 = top examples; 0.. = activation interval, lowest first.")
    rank: Mapped[int] = mapped_column(Integer, doc="0 = highest activation (top) or first sample (interval).")
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    activation: Mapped[float] = mapped_column(Float)
    token_map: Mapped[bytes | None] = mapped_column(
        LargeBinary, nullable=True,
        doc="Top examples of an SAE over several tokens: the activation on each token as uint8 fractions of "
        "`activation` (clipscope/token_maps.py); null for CLS-only SAEs and interval samples.",
    )


class Label(Base):
    """The current label of a feature (the newest revision); never written by the pipeline."""

    __tablename__ = "labels"
    __table_args__ = (
        UniqueConstraint("sae_id", "feature", name="uq_labels_feature"),
        Index("ix_labels_sae_category", "sae_id", "category"),
        Index("ix_labels_sae_text", "sae_id", "text"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"))
    feature: Mapped[int] = mapped_column(Integer)
    revision: Mapped[int] = mapped_column(Integer, doc="Number of the revision this row mirrors (1 = first).")
    text: Mapped[str] = mapped_column(Text)
    category: Mapped[str] = mapped_column(String(16), doc="semantic | visual | noise | unclear.")
    author: Mapped[str] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class LabelRevision(Base):
    """Append-only history of label edits."""

    __tablename__ = "label_revisions"
    __table_args__ = (UniqueConstraint("sae_id", "feature", "revision", name="uq_label_revisions_revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), index=True)
    feature: Mapped[int] = mapped_column(Integer)
    revision: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    category: Mapped[str] = mapped_column(String(16))
    author: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class User(Base):
    """An account for CLIPSCOPE_AUTH=password; the password is stored as a salted scrypt hash."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256), doc="scrypt$n$r$p$salt$hash (base64).")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
