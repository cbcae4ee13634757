"""The schema. Alembic revisions under ``migrations/`` must match it (a test checks for drift)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


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
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

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
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, doc="Splice check, precision, seconds.")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    sae: Mapped[Sae] = relationship(back_populates="evaluations")
