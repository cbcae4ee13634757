"""The SAEs a database and data dir hold, what each takes on disk, and removing one with what only it used.

An SAE is a row of ``saes`` (with its features, examples, labels, curve and evaluations) and files:
its folder ``saes/<key>/`` (weights, checkpoints, concept-search directions) and its collages
``collages/<key>/``. It shares the rest: image rows and their thumbnails (by dataset index and
content hash) and activation caches (by the hash of what they hold) serve every SAE over the same
images. Removing an SAE removes its rows and files, the image rows and thumbnails no other SAE's
examples use, and, when asked, the activation caches no other SAE reads.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from clipscope.db.models import Evaluation, Feature, FeatureExample, Image, Label, LabelRevision, Sae, SaeOverlap, TrainingPoint
from clipscope.errors import ClipScopeError
from clipscope.storage import DataLayout

FILES_ONLY = "files only"
"""The status of a folder under ``saes/`` that no row names (a database reset or replaced, a removal cut short)."""

_CHUNK = 500  # ids per IN (...): under SQLite's and PostgreSQL's parameter limits


@dataclass(frozen=True)
class SaeEntry:
    """One SAE as ``clipscope saes list`` shows it."""

    key: str
    status: str
    """The row's status (training, trained, failed, ready), or ``files only``."""
    recipe: str | None = None
    d_sae: int | None = None
    k: int | None = None
    layer: int | None = None
    tokens: str | None = None
    evr: float | None = None
    """Held-out explained variance ratio (``metrics.evr``)."""
    l0: float | None = None
    labelled: int = 0
    """Features with a label."""
    revisions: int = 0
    """Label revisions (what an export holds)."""
    disk_bytes: int = 0
    """Its own files: its folder and its collages (shared images and caches not counted)."""
    caches: tuple[str, ...] = ()
    """The activation caches it was trained, held out and precomputed on."""
    updated_at: datetime | None = None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["caches"] = list(self.caches)
        out["updated_at"] = self.updated_at.isoformat() if self.updated_at else None
        return out


@dataclass
class Removal:
    """What removing one SAE takes away, worked out before anything is removed."""

    entry: SaeEntry
    sae_id: int | None
    """Its row's id; None for a folder no row names."""
    folders: list[Path]
    """Its folder and its collages, those that exist."""


@dataclass
class RemovalPlan:
    saes: list[Removal]
    own_caches: list[tuple[Path, int]]
    """Activation caches these SAEs read that no other SAE reads, with their sizes: removed only when asked."""


@dataclass
class Removed:
    key: str
    features: int = 0
    examples: int = 0
    revisions: int = 0
    images: int = 0
    thumbnails: int = 0
    freed_bytes: int = 0


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def human_bytes(n: float) -> str:
    """In decimal units, as disks are sold: ``950 B``, ``23.7 MB``, ``2.2 GB``."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def caches_of(sae: Sae) -> tuple[str, ...]:
    """The activation caches the SAE read: training, held-out evaluation, precompute (in that order, once each)."""
    names = [(sae.provenance or {}).get("train_cache"), (sae.provenance or {}).get("eval_cache"), (sae.precompute or {}).get("cache")]
    return tuple(dict.fromkeys(n for n in names if n))


def _own_folders(layout: DataLayout, key: str) -> list[Path]:
    """Its folder and its collages; none for a key that is not a plain folder name (no pipeline writes one,
    and removing such a row must touch no file outside ``saes/`` and ``collages/``)."""
    if Path(key).name != key or key in ("", ".", ".."):
        return []
    return [layout.saes / key, layout.collages / key]


def _counts(session: Session, table, sae_ids: list[int]) -> dict[int, int]:
    """Rows of ``table`` per SAE id."""
    rows = session.execute(select(table.sae_id, func.count()).where(table.sae_id.in_(sae_ids)).group_by(table.sae_id))
    return dict(rows.all())


def sae_row(session: Session, key: str) -> Sae:
    """The SAE row of ``key``; ClipScopeError naming the keys there are when it names none."""
    row = session.scalar(select(Sae).where(Sae.key == key))
    if row is None:
        known = session.scalars(select(Sae.key).order_by(Sae.created_at.desc())).all()
        there = f"its SAEs: {', '.join(known)}" if known else "it has none yet (`clipscope run CONFIG` makes one)"
        raise ClipScopeError(f"No SAE {key!r} in {session.get_bind().url.render_as_string()}; {there}.")
    return row


def list_saes(session: Session, layout: DataLayout) -> list[SaeEntry]:
    """Every SAE row, newest first, then every folder under ``saes/`` that no row names."""
    rows = session.scalars(select(Sae).order_by(Sae.created_at.desc(), Sae.key)).all()
    ids = [r.id for r in rows]
    labelled = _counts(session, Label, ids) if ids else {}
    revisions = _counts(session, LabelRevision, ids) if ids else {}
    out = []
    for r in rows:
        metrics = r.metrics or {}
        out.append(SaeEntry(
            key=r.key, status=r.status, recipe=r.recipe, d_sae=r.d_sae, k=r.k, layer=r.layer, tokens=r.tokens,
            evr=metrics.get("evr"), l0=metrics.get("l0"), labelled=labelled.get(r.id, 0), revisions=revisions.get(r.id, 0),
            disk_bytes=sum(folder_bytes(p) for p in _own_folders(layout, r.key)), caches=caches_of(r), updated_at=r.updated_at,
        ))
    named = {r.key for r in rows}
    if layout.saes.is_dir():
        for folder in sorted(layout.saes.iterdir()):
            if folder.is_dir() and not folder.name.startswith(".") and folder.name not in named:
                out.append(SaeEntry(key=folder.name, status=FILES_ONLY, disk_bytes=folder_bytes(folder) + folder_bytes(layout.collages / folder.name)))
    return out


def plan_removal(session: Session, layout: DataLayout, keys: list[str], discard_labels: bool = False) -> RemovalPlan:
    """What removing the SAEs ``keys`` takes away. Raises ClipScopeError, before anything is removed, for a
    key that names nothing, and for an SAE with labels unless ``discard_labels`` (they are the one thing
    here no run can make again)."""
    entries = {e.key: e for e in list_saes(session, layout)}
    keys = list(dict.fromkeys(keys))
    unknown = [key for key in keys if key not in entries]
    if unknown:
        there = ", ".join(entries) or "none"
        raise ClipScopeError(f"No SAE {', '.join(map(repr, unknown))} in the database or under {layout.saes}; there are: {there}.")
    saes = []
    for key in keys:
        entry = entries[key]
        if entry.revisions and not discard_labels:
            raise ClipScopeError(
                f"SAE {key} has {plural(entry.revisions, 'label revision')} ({plural(entry.labelled, 'labelled feature')}), which no run can make again. "
                f"Export them first (`clipscope export {key} -o {key}-labels.jsonl`; `clipscope import` brings them back), "
                f"then remove it with --discard-labels."
            )
        sae_id = None if entry.status == FILES_ONLY else session.scalar(select(Sae.id).where(Sae.key == key))
        saes.append(Removal(entry, sae_id, [p for p in _own_folders(layout, key) if p.exists()]))
    read_by_others = {name for e in entries.values() if e.key not in keys for name in e.caches}
    own = dict.fromkeys(name for key in keys for name in entries[key].caches if name not in read_by_others)
    caches = [(layout.activations / name, folder_bytes(layout.activations / name)) for name in own
              if Path(name).name == name and (layout.activations / name).is_dir()]
    return RemovalPlan(saes, caches)


def remove_sae(session: Session, layout: DataLayout, plan: Removal) -> Removed:
    """Carry out ``plan``: the rows in the session's transaction, committed here; then the files.

    Rows go first, so a removal cut short leaves files no row names (``files only``, removable again),
    never a row whose files are gone. Image rows go when no other SAE's examples use them, and a
    thumbnail when no image row is left that shows it.
    """
    done = Removed(plan.entry.key)
    freed = sum(folder_bytes(p) for p in plan.folders)
    thumbnails: set[str] = set()
    if plan.sae_id is not None:
        sid = plan.sae_id
        others = select(FeatureExample.id).where(FeatureExample.image_id == Image.id, FeatureExample.sae_id != sid).exists()
        mine = select(FeatureExample.image_id).where(FeatureExample.sae_id == sid)
        orphans = session.execute(select(Image.id, Image.thumbnail).where(Image.id.in_(mine), ~others)).all()
        done.revisions = session.execute(delete(LabelRevision).where(LabelRevision.sae_id == sid)).rowcount
        session.execute(delete(Label).where(Label.sae_id == sid))
        done.examples = session.execute(delete(FeatureExample).where(FeatureExample.sae_id == sid)).rowcount
        done.features = session.execute(delete(Feature).where(Feature.sae_id == sid)).rowcount
        session.execute(delete(Evaluation).where(Evaluation.sae_id == sid))
        session.execute(delete(TrainingPoint).where(TrainingPoint.sae_id == sid))
        session.execute(delete(SaeOverlap).where((SaeOverlap.sae_id == sid) | (SaeOverlap.other_id == sid)))
        session.execute(delete(Sae).where(Sae.id == sid))
        ids = [i for i, _ in orphans]
        for start in range(0, len(ids), _CHUNK):
            session.execute(delete(Image).where(Image.id.in_(ids[start:start + _CHUNK])))
        done.images = len(ids)
        candidates = sorted({t for _, t in orphans})
        still_shown: set[str] = set()
        for start in range(0, len(candidates), _CHUNK):
            still_shown.update(session.scalars(select(Image.thumbnail).where(Image.thumbnail.in_(candidates[start:start + _CHUNK]))))
        thumbnails = set(candidates) - still_shown
        session.commit()
    for folder in plan.folders:
        shutil.rmtree(folder, ignore_errors=True)
    for rel in sorted(thumbnails):
        path = layout.root / rel
        if path.is_file() and path.resolve().is_relative_to(layout.thumbnails.resolve()):
            freed += path.stat().st_size
            path.unlink()
            done.thumbnails += 1
    done.freed_bytes = freed
    return done


def remove_caches(caches: list[tuple[Path, int]]) -> int:
    """Remove activation caches (a :class:`RemovalPlan`'s ``own_caches``); returns the bytes freed."""
    for path, _ in caches:
        shutil.rmtree(path, ignore_errors=True)
    return sum(size for _, size in caches)
