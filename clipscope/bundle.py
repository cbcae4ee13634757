"""One SAE as one file, to move it between ClipScope installations (a GPU server's PostgreSQL to a laptop's
SQLite, or to a colleague): ``clipscope saes export KEY -o FILE`` and ``clipscope saes import FILE``.

A bundle is an uncompressed tar holding

* ``clipscope-bundle.json``: the format, the database schema revision it was written at, the SAE's row;
* ``rows/<table>.jsonl.gz``: the SAE's rows of every table that belongs to it (features, examples, labels
  with their history, training curve, evaluations) and the image rows its examples show, without
  database ids: an example names its image by ``(dataset_key, index)``;
* ``files/``: its folder under ``saes/`` (weights and concept-search directions; checkpoints left out),
  the thumbnails of its images and, when asked, its activation caches.

Importing inserts the rows under new ids in one transaction, reusing image rows (and thumbnails) the
target already has, then copies the files; an SAE whose key the target has is refused.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy import LargeBinary, select
from sqlalchemy.orm import Session

from clipscope.db.bulk import analyze, gc_paused, insert_rows
from clipscope.db.images import upsert_images
from clipscope.db.migrate import head_revision
from clipscope.db.models import Evaluation, Feature, FeatureExample, Image, Label, LabelRevision, Sae, TrainingPoint, UtcDateTime
from clipscope.db.session import bulk_writes, json_loads
from clipscope.errors import ClipScopeError
from clipscope.inventory import caches_of, sae_row
from clipscope.storage import DataLayout
from clipscope.thumbnails import thumbnail_relpath

FORMAT = 1
MANIFEST = "clipscope-bundle.json"
OWN_TABLES = (Feature, Label, LabelRevision, TrainingPoint, Evaluation)
"""The tables whose rows belong to one SAE by ``sae_id`` alone (examples name their images, so they go apart)."""
_HASH = re.compile(r"[0-9a-f]{64}")


def _plain(table, row: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    """A row as JSON values: times as ISO text, bytes as base64; ``drop`` (ids) left out."""
    out = {}
    for column in table.__table__.columns:
        if column.key in drop:
            continue
        value = row[column.key]
        if value is not None and isinstance(column.type, LargeBinary):
            value = base64.b64encode(value).decode()
        elif isinstance(value, datetime):
            value = value.isoformat()
        out[column.key] = value
    return out


def _typed(table, row: dict[str, Any]) -> dict[str, Any]:
    """:func:`_plain` read back; a column the bundle does not name is left to its default."""
    decoders = _decoders(table)
    out = {}
    for key, value in row.items():
        if key not in decoders:
            raise ClipScopeError(f"The bundle's {table.__tablename__} rows have a column {key!r} this ClipScope does not know.")
        decode = decoders[key]
        out[key] = value if decode is None or value is None else decode(value)
    return out


@lru_cache(maxsize=None)
def _decoders(table) -> dict[str, Callable[[Any], Any] | None]:
    """Per column of ``table``, what turns :func:`_plain`'s value back into the column's (None: the value itself)."""
    return {c.key: base64.b64decode if isinstance(c.type, LargeBinary) else datetime.fromisoformat if isinstance(c.type, UtcDateTime) else None
            for c in table.__table__.columns}


def _mapped(session: Session, statement) -> Iterator[dict[str, Any]]:
    """Rows as dicts, fetched in batches (a server-side cursor on PostgreSQL): an SAE has millions of examples."""
    for row in session.execute(statement.execution_options(yield_per=10_000)).mappings():
        yield dict(row)


_LINES_PER_WRITE = 10_000


def _add_jsonl(tar: tarfile.TarFile, name: str, rows: Iterator[dict[str, Any]]) -> int:
    """``rows`` as gzipped JSON lines, handed to gzip :data:`_LINES_PER_WRITE` lines at a time and compressed at zlib's default
    level (gzip's own, 9, took 2-3x the time for a few per cent: 10 s of a 49,152-feature SAE's 29 s export)."""
    buf, n = io.BytesIO(), 0
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:
        while lines := [json.dumps(row, sort_keys=True) for row in islice(rows, _LINES_PER_WRITE)]:
            gz.write(("\n".join(lines) + "\n").encode())
            n += len(lines)
    info = tarfile.TarInfo(name)
    info.size = buf.tell()
    buf.seek(0)
    tar.addfile(info, buf)
    return n


def export_bundle(session: Session, layout: DataLayout, key: str, out: Path, caches: bool = False) -> dict[str, int]:
    """Write the SAE ``key`` to ``out`` (a temporary sibling renamed at the end); returns the rows per table."""
    sae = sae_row(session, key)
    if Path(key).name != key:
        raise ClipScopeError(f"{key!r} is not an SAE key that names a folder; it cannot be bundled.")
    counts: dict[str, int] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp", delete=False) as tmp:
        try:
            with tarfile.open(fileobj=tmp, mode="w") as tar, gc_paused():  # the collector would walk every batch of rows again and again
                for table in OWN_TABLES:
                    drop = ("id", "sae_id")
                    rows = (_plain(table, r, drop) for r in _mapped(session, select(table.__table__).where(table.sae_id == sae.id)))
                    counts[table.__tablename__] = _add_jsonl(tar, f"rows/{table.__tablename__}.jsonl.gz", rows)
                shown = select(Image.__table__).where(Image.id.in_(select(FeatureExample.image_id).where(FeatureExample.sae_id == sae.id)))
                images = {r["id"]: r for r in _mapped(session, shown)}
                counts["images"] = _add_jsonl(tar, "rows/images.jsonl.gz", (_plain(Image, r, ("id",)) for r in images.values()))
                examples = (
                    {**_plain(FeatureExample, r, ("id", "sae_id", "image_id")), "image": [images[r["image_id"]]["dataset_key"], images[r["image_id"]]["index"]]}
                    for r in _mapped(session, select(FeatureExample.__table__).where(FeatureExample.sae_id == sae.id))
                )
                counts["feature_examples"] = _add_jsonl(tar, "rows/feature_examples.jsonl.gz", examples)
                folder = layout.saes / key
                derived = ("/checkpoints", "/set-thresholds")  # training's state; the notebook's screen, made again on first use
                tar.add(folder, f"files/saes/{key}", filter=lambda info: None if any(d in info.name for d in derived) else info)
                for rel in sorted({r["thumbnail"] for r in images.values()}):
                    if (layout.root / rel).is_file():
                        tar.add(layout.root / rel, f"files/{rel}")
                if caches:
                    for name in caches_of(sae):
                        if (layout.activations / name).is_dir():
                            tar.add(layout.activations / name, f"files/activations/{name}")
                manifest = {"format": FORMAT, "schema": head_revision(), "sae": _plain(Sae, _row_dict(sae), ("id",)), "counts": counts}
                data = json.dumps(manifest, indent=2, sort_keys=True).encode()
                info = tarfile.TarInfo(MANIFEST)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            tmp.flush()
        except BaseException:
            Path(tmp.name).unlink(missing_ok=True)
            raise
    Path(tmp.name).replace(out)
    return counts


def _row_dict(sae: Sae) -> dict[str, Any]:
    return {c.key: getattr(sae, c.key) for c in Sae.__table__.columns}


def _rows(tar: tarfile.TarFile, table: str) -> Iterator[dict[str, Any]]:
    member = tar.extractfile(f"rows/{table}.jsonl.gz")
    if member is None:
        raise ClipScopeError(f"The bundle has no rows/{table}.jsonl.gz.")
    with gzip.GzipFile(fileobj=member) as gz:
        for line in gz:
            yield json_loads(line)


def read_manifest(path: Path) -> dict[str, Any]:
    """The bundle's manifest; ClipScopeError for a file that is no bundle or one of another format or schema."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            member = tar.extractfile(MANIFEST)
            manifest = json.loads(member.read()) if member else None
    except (tarfile.TarError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ClipScopeError(f"{path} is not a ClipScope bundle ({exc}).") from None
    if not manifest or manifest.get("format") != FORMAT:
        raise ClipScopeError(f"{path} is not a ClipScope bundle of format {FORMAT}.")
    if manifest.get("schema") != head_revision():
        raise ClipScopeError(f"{path} was written at database schema {manifest.get('schema')}, this ClipScope is at {head_revision()}: "
                             "export it again with this version of ClipScope.")
    return manifest


def import_bundle(session: Session, layout: DataLayout, path: Path) -> tuple[str, dict[str, int]]:
    """Insert the bundle's rows in the session's transaction (committed here), then copy its files; returns
    the SAE's key and the rows added per table. An SAE whose key is already here is refused, before anything."""
    manifest = read_manifest(path)
    fields = _typed(Sae, manifest["sae"])
    key = fields["key"]
    if Path(key).name != key or key in ("", ".", ".."):
        raise ClipScopeError(f"The bundle's SAE key {key!r} is not a folder name.")
    if session.scalar(select(Sae.id).where(Sae.key == key)) is not None:
        raise ClipScopeError(f"SAE {key} is already in this database: remove it first (`clipscope saes remove {key}`) to import it again.")
    added: dict[str, int] = {}
    with tarfile.open(path, mode="r:") as tar:
        sae = Sae(**fields)
        files = _files(tar, key, caches_of(sae))
        incoming = [_typed(Image, r) for r in _rows(tar, "images")]
        for image in incoming:  # the server opens a thumbnail by this path: it must be the one its hash names
            if not _HASH.fullmatch(str(image["content_hash"])) or image["thumbnail"] != thumbnail_relpath(image["content_hash"]):
                raise ClipScopeError(f"The bundle's image {image['dataset']} #{image['index']} names the thumbnail {image['thumbnail']!r}, "
                                     "not the one of its content hash: nothing was imported.")
        with bulk_writes(session), gc_paused():
            session.add(sae)
            session.flush()
            for table in OWN_TABLES:
                added[table.__tablename__] = insert_rows(session, table.__table__, ({**_typed(table, r), "sae_id": sae.id} for r in _rows(tar, table.__tablename__)))
            ids, added["images"] = upsert_images(session, incoming)  # sharing the rows of the SAEs over the same images here
            analyze(session, Feature.__table__, Image.__table__)  # what the examples' foreign keys are checked against
            examples = ({**_typed(FeatureExample, {k: v for k, v in r.items() if k != "image"}), "sae_id": sae.id, "image_id": ids[tuple(r["image"])]}
                        for r in _rows(tar, "feature_examples"))
            added["feature_examples"] = insert_rows(session, FeatureExample.__table__, examples)
            analyze(session, FeatureExample.__table__)  # what the pages read first
        session.commit()
        _copy_files(tar, layout, files, key)
    return key, added


def _files(tar: tarfile.TarFile, key: str, caches: tuple[str, ...]) -> list[tuple[tarfile.TarInfo, str]]:
    """The bundle's files with their paths under the data dir: its SAE's folder, thumbnails, its caches' files;
    ClipScopeError, before anything is imported, for any other."""
    allowed = (f"saes/{key}/", "thumbnails/", *(f"activations/{name}/" for name in caches))
    out = []
    for member in tar.getmembers():
        if not member.name.startswith("files/") or member.isdir():
            continue
        rel = member.name.removeprefix("files/")
        if not member.isfile() or not rel.startswith(allowed) or ".." in Path(rel).parts:
            raise ClipScopeError(f"The bundle's file {member.name} is not one of its SAE's files: nothing was imported.")
        out.append((member, rel))
    return out


def _copy_files(tar: tarfile.TarFile, layout: DataLayout, files: list[tuple[tarfile.TarInfo, str]], key: str) -> None:
    """Each file to its place under the data dir (a temporary sibling renamed); a thumbnail or cache file already
    here is kept (the same name holds the same content)."""
    for member, rel in files:
        target = layout.root / rel
        if target.exists() and not rel.startswith(f"saes/{key}/"):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        with open(tmp, "wb") as fh:
            shutil.copyfileobj(tar.extractfile(member), fh)
        tmp.replace(target)
