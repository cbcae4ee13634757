"""``clipscope``: one command with a subcommand per stage."""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from sqlalchemy.exc import OperationalError

from clipscope.config import load_config
from clipscope.errors import ClipScopeError

if TYPE_CHECKING:
    from worker.context import Context

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train SAEs on CLIP ViT-B/32 and explore their features.")
db_app = typer.Typer(no_args_is_help=True, help="Database maintenance.")
app.add_typer(db_app, name="db")
users_app = typer.Typer(no_args_is_help=True, help="Accounts for CLIPSCOPE_AUTH=password.")
app.add_typer(users_app, name="users")
saes_app = typer.Typer(no_args_is_help=True, help="The SAEs of the database and data dir: list, remove, export and import them.")
app.add_typer(saes_app, name="saes")

def _print_versions(asked: bool) -> None:
    """``--version``: ClipScope's and the versions that decide its results, read from the installed metadata (no import)."""
    if not asked:
        return
    from importlib.metadata import PackageNotFoundError, version

    import clipscope

    parts = [f"clipscope {clipscope.__version__}"]
    for name in ("torch", "torchvision", "open_clip_torch", "fastapi", "sqlalchemy"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    typer.echo(", ".join(parts))
    raise typer.Exit()


@app.callback()
def _options(
    _version: bool = typer.Option(False, "--version", callback=_print_versions, is_eager=True,
                                  help="Print the versions of ClipScope, torch, torchvision, open_clip, FastAPI and SQLAlchemy, then exit."),
) -> None:
    """Train SAEs on CLIP ViT-B/32 and explore their features."""


CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
ConfigArg = typer.Argument(..., dir_okay=False, help="Run config (TOML), e.g. configs/seed.toml.")
SetOpt = typer.Option(
    None, "--set", metavar="KEY=VALUE",
    help="Override a config key, e.g. --set sae.k=64 --set train.epochs=1 (repeatable; the value is TOML, or else text). "
    "The SAE's key follows the config, so each variant is an SAE of its own.",
)


def _setup() -> "Context":
    """Console logging and the process context (imported late: ``--help`` needs no torch)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    for name in ("clipscope", "worker"):
        logging.getLogger(name).setLevel(logging.INFO)
    from worker.context import Context

    return Context.from_env()


@app.command()
def extract(config: Path = ConfigArg, overrides: list[str] = SetOpt) -> None:
    """Extract CLIP activations at the hooked block into the activation cache (resumes, or reuses)."""
    from worker.pipeline import run_extract

    run_extract(_setup(), load_config(config, overrides or ()))


@app.command()
def train(config: Path = ConfigArg, overrides: list[str] = SetOpt) -> None:
    """Train the SAE (extracting first if needed), resuming from the last checkpoint; or import sae.import_from."""
    from worker.pipeline import run_train

    run_train(_setup(), load_config(config, overrides or ()))


@app.command()
def evaluate(config: Path = ConfigArg, overrides: list[str] = SetOpt) -> None:
    """Zero-shot accuracy clean vs with the SAE spliced in (training first if needed); prints the table."""
    from worker.pipeline import run_evaluate

    run_evaluate(_setup(), load_config(config, overrides or ()))


@app.command()
def precompute(config: Path = ConfigArg, overrides: list[str] = SetOpt) -> None:
    """Per-feature statistics, top and interval examples, neighbours and thumbnails into the database."""
    from worker.pipeline import run_precompute

    run_precompute(_setup(), load_config(config, overrides or ()))


@app.command()
def run(config: Path = ConfigArg, overrides: list[str] = SetOpt) -> None:
    """Run every stage of the pipeline in order; finished stages are reused."""
    from worker.pipeline import run_all

    run_all(_setup(), load_config(config, overrides or ()))


@app.command()
def steer(
    config: Path = ConfigArg,
    overrides: list[str] = SetOpt,
    edits: str = typer.Option(..., help="Features to edit in every image's stream, e.g. '1234=0, 567*3': "
                              "feature=value sets its activation, feature*factor scales it where it fires."),
    dataset: list[str] = typer.Option(None, help="An evaluation set of the config to use (repeat for several; default: all)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the answer as JSON to this file (per set: accuracy, "
                                  "per-class changes, how often each edited feature fires)."),
) -> None:
    """Zero-shot accuracy with SAE features edited in every image's residual stream, against clean CLIP (stores nothing)."""
    from worker.pipeline import run_steer

    results = run_steer(_setup(), load_config(config, overrides or ()), edits, dataset or None)
    if json_out is not None:
        json_out.write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")


@app.command()
def demo(
    config: Path = typer.Option(CONFIGS_DIR / "demo.toml", help="Config of the demo run."),
    overrides: list[str] = SetOpt,
    serve_after: bool = typer.Option(True, "--serve/--no-serve", help="Serve the explorer when the pipeline is done."),
    host: str = typer.Option("127.0.0.1", help="Interface to serve on."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to serve on."),
) -> None:
    """The offline demo: synthetic images, random-initialised CLIP, a small SAE, SQLite under the data dir; then serve."""
    from worker.pipeline import run_all

    if serve_after:
        _check_listenable(host, port)  # a port in use is said before minutes of pipeline, not after
    ctx = _setup()
    run_all(ctx, load_config(config, overrides or ()))
    if serve_after:
        serve(host=host, port=port, workers=1)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port."),
    workers: int = typer.Option(1, min=1, help="Uvicorn worker processes."),
) -> None:
    """Serve the feature explorer and the JSON API (the database must be migrated: `clipscope db upgrade`)."""
    import uvicorn

    from backend.app import create_app

    _setup()
    create_app()  # fail here, with a clear message, if the database is not ready
    _check_listenable(host, port)
    typer.echo(f"ClipScope explorer: http://{host}:{port}/", err=True)
    uvicorn.run("backend.app:serve_app", factory=True, host=host, port=port, workers=workers, log_level="warning")


def _check_listenable(host: str, port: int) -> None:
    """Bind ``host:port`` once, as uvicorn will, so that a port in use is one sentence before the URL is printed."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
            probe.bind(address)
    except OSError as exc:
        raise ClipScopeError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host.") from None


class LabelFormat(str, Enum):
    """The two forms exports travel in (``--format``): one JSON object per line, or CSV with a header."""

    jsonl = "jsonl"
    csv = "csv"


@app.command("export")
def export_labels(
    sae: str = typer.Argument(..., help="SAE key (its folder name under <data_dir>/saes)."),
    fmt: LabelFormat = typer.Option(LabelFormat.jsonl, "--format", help="jsonl or csv."),
    output: Path = typer.Option(None, "--output", "-o", help="File to write (default: standard output)."),
    features: bool = typer.Option(
        False, "--features", help="Export the feature table instead: every feature's statistics and current label, in index order "
        "(the API's /api/saes/{sae}/features.csv)."
    ),
) -> None:
    """Export every label revision of an SAE (JSONL or CSV), or with --features its feature table."""
    from backend.services import labels
    from backend.services.csv_export import csv_text
    from clipscope.db.models import SaeStatus

    with _sae_session(sae) as (session, row):
        if features:
            from backend.services import features as feature_service
            from backend.services.feature_order import FeatureOrders

            if row.status != SaeStatus.READY:
                raise ClipScopeError(f"SAE {sae} has no feature table yet (status: {row.status}); run `clipscope precompute` first.")
            rows = feature_service.feature_table(session, row, feature_service.FeatureFilter(), FeatureOrders())
            fields = feature_service.table_fields()
        else:
            rows, fields = labels.export_rows(session, row), labels.EXPORT_FIELDS
        text = labels.to_jsonl(rows) if fmt is LabelFormat.jsonl else csv_text(rows, fields)
    if output:
        output.write_text(text, encoding="utf-8", newline="")  # exactly the text: CSV lines end in \r\n
    else:
        typer.echo(text, nl=False)


@app.command("import")
def import_labels(
    sae: str = typer.Argument(..., help="SAE key."),
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="A JSONL or CSV export."),
    fmt: LabelFormat | None = typer.Option(None, "--format", help="jsonl or csv (default: from the file extension)."),
) -> None:
    """Import labels: appends revisions, skips ones already present, never overwrites."""
    from backend.services import labels

    fmt = fmt or (LabelFormat.csv if path.suffix.lower() == ".csv" else LabelFormat.jsonl)
    with _sae_session(sae) as (session, row):
        try:
            result = labels.import_rows(session, row, labels.parse_export(path.read_bytes(), fmt.value))
        except labels.LabelError as exc:
            raise ClipScopeError(f"{path}: {exc}") from None
    typer.echo(f"added {result['added']} revisions, skipped {result['skipped']} already present")


class ReportOrder(str, Enum):
    frequency = "frequency"
    sample = "sample"
    labelled = "labelled"


@app.command("report")
def report(
    sae: str = typer.Argument(..., help="SAE key."),
    output: Path = typer.Option(..., "--output", "-o", file_okay=False, help="Folder to write README.md and collages/ into (made if missing)."),
    features: int = typer.Option(300, "--features", min=1, help="How many features to show."),
    order: ReportOrder = typer.Option(
        ReportOrder.frequency, "--order",
        help="Which: frequency (the most frequently firing, as the study chose its 300), sample (the first of the random sample "
        "order) or labelled (the labelled features).",
    ),
) -> None:
    """Write an SAE up as the study was: its recipe, reconstruction, zero-shot accuracy, feature statistics
    and label estimates, then a collage, label and statistics per chosen feature (Markdown and PNGs)."""
    from backend.services.report import write_report
    from clipscope.settings import get_settings

    with _sae_session(sae) as (session, row):
        path = write_report(session, row, get_settings().data_dir, output, features, order.value)
    typer.echo(f"wrote {path}")


def _sae_session(key: str):
    from contextlib import contextmanager

    from clipscope.db.session import session_scope
    from clipscope.inventory import sae_row

    @contextmanager
    def scope():
        with session_scope(_setup().database_url) as session:
            yield session, sae_row(session, key)

    return scope()


@saes_app.command("list")
def saes_list(as_json: bool = typer.Option(False, "--json", help="One JSON array, every field of every SAE.")) -> None:
    """Every SAE, newest first: status, recipe, shape, site, held-out EVR and L0, labels, its own disk use;
    then the folders under <data_dir>/saes that no database row names ("files only")."""
    from clipscope.db.session import session_scope
    from clipscope.inventory import FILES_ONLY, human_bytes, list_saes

    ctx = _setup()
    with session_scope(ctx.database_url) as session:
        entries = list_saes(session, ctx.layout)
    if as_json:
        typer.echo(json.dumps([e.as_dict() for e in entries], indent=2))
        return
    if not entries:
        typer.echo("no SAEs yet (`clipscope run CONFIG` makes one)")
        return
    table = [("KEY", "STATUS", "RECIPE", "LATENTS", "K", "SITE", "EVR", "L0", "LABELLED", "DISK", "UPDATED")]
    for e in entries:
        table.append((
            e.key, e.status, e.recipe or "", f"{e.d_sae:,}" if e.d_sae else "", str(e.k or ""),
            f"L{e.layer} {e.tokens}" if e.tokens else "", f"{e.evr:.4f}" if e.evr is not None else "",
            f"{e.l0:.1f}" if e.l0 is not None else "", str(e.labelled) if e.status != FILES_ONLY else "",
            human_bytes(e.disk_bytes), f"{e.updated_at:%Y-%m-%d %H:%M}" if e.updated_at else "",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@saes_app.command("remove")
def saes_remove(
    keys: list[str] = typer.Argument(..., help="SAE keys (as `clipscope saes list` shows them)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Remove without asking."),
    discard_labels: bool = typer.Option(False, "--discard-labels", help="Remove an SAE that has labels (export them first)."),
    caches: bool = typer.Option(False, "--caches", help="Also remove the activation caches that only these SAEs read "
                                "(reused by any later run over the same images, so kept by default)."),
) -> None:
    """Remove SAEs: their rows (features, examples, labels, curve, evaluations), folders and collages, and the
    image rows and thumbnails no other SAE shows. Every key is checked before anything is removed."""
    from clipscope.db.session import session_scope
    from clipscope.inventory import human_bytes, plan_removal, plural, remove_caches, remove_sae

    ctx = _setup()
    with session_scope(ctx.database_url) as session:
        plan = plan_removal(session, ctx.layout, keys, discard_labels)
    for one in plan.saes:
        e = one.entry
        what = "no database row" if one.sae_id is None else f"{e.status}, {e.recipe}, {e.d_sae:,} latents, {plural(e.revisions, 'label revision')}"
        typer.echo(f"{e.key} ({what}): {human_bytes(e.disk_bytes)} of its own files")
    if plan.own_caches:
        size = human_bytes(sum(n for _, n in plan.own_caches))
        verb = "to be removed" if caches else "kept (--caches removes them)"
        typer.echo(f"activation caches no other SAE reads, {size}, {verb}: {', '.join(p.name for p, _ in plan.own_caches)}")
    if not yes:
        if not sys.stdin.isatty():
            raise ClipScopeError("Nothing removed: pass --yes to remove without a terminal to ask on.")
        if not typer.confirm(f"Remove {len(plan.saes)} SAE{'s' if len(plan.saes) > 1 else ''}?"):
            raise typer.Exit(1)
    for one in plan.saes:
        with session_scope(ctx.database_url) as session:
            done = remove_sae(session, ctx.layout, one)
        rows = "" if one.sae_id is None else (
            f" {plural(done.features, 'feature')}, {plural(done.examples, 'example')}, {plural(done.revisions, 'label revision')}, "
            f"{plural(done.images, 'image row')} and {plural(done.thumbnails, 'thumbnail')} no other SAE shows;"
        )
        typer.echo(f"removed {done.key}:{rows} {human_bytes(done.freed_bytes)} of files freed")
    if caches and plan.own_caches:
        freed = remove_caches(plan.own_caches)
        typer.echo(f"removed {plural(len(plan.own_caches), 'activation cache')}; {human_bytes(freed)} freed")
    if any(one.sae_id is not None for one in plan.saes):
        typer.echo("the database keeps the space of the removed rows for later runs; `clipscope db vacuum` gives it back")


@saes_app.command("export")
def saes_export(
    key: str = typer.Argument(..., help="SAE key."),
    output: Path = typer.Option(..., "--output", "-o", dir_okay=False, help="The bundle to write (a tar file)."),
    caches: bool = typer.Option(False, "--caches", help="Also bundle its activation caches (for its images' pages, "
                                "\"fires together with\" and the notebook; large with patch tokens)."),
) -> None:
    """Write one SAE to one file: its rows (features, examples, labels with their history, curve, evaluations),
    the image rows and thumbnails it shows, its weights; `clipscope saes import` reads it into another installation."""
    from clipscope.bundle import export_bundle
    from clipscope.db.session import session_scope
    from clipscope.inventory import human_bytes

    ctx = _setup()
    with session_scope(ctx.database_url) as session:
        counts = export_bundle(session, ctx.layout, key, output, caches=caches)
    typer.echo(f"wrote {output} ({human_bytes(output.stat().st_size)}): "
               + ", ".join(f"{n:,} {table.replace('_', ' ')}" for table, n in counts.items()))


@saes_app.command("import")
def saes_import(path: Path = typer.Argument(..., exists=True, dir_okay=False, help="A bundle from `clipscope saes export`.")) -> None:
    """Add the SAE of a bundle to this installation: its rows under new ids (image rows and thumbnails already
    here are shared), its files; then how many features it shares with the SAEs at its hook site here."""
    from clipscope.bundle import import_bundle
    from clipscope.db.session import session_scope
    from worker.precompute.overlaps import update_overlaps

    ctx = _setup()
    with session_scope(ctx.database_url) as session:
        key, added = import_bundle(session, ctx.layout, path)
    typer.echo(f"imported {key}: " + ", ".join(f"{n:,} {table.replace('_', ' ')}" for table, n in added.items()))
    measured = update_overlaps(ctx, key)
    if measured:
        typer.echo(f"features shared with {', '.join(measured)} measured")


@saes_app.command("overlaps")
def saes_overlaps(keys: list[str] = typer.Argument(None, help="SAE keys; default: every ready SAE.")) -> None:
    """Measure how many features the SAEs at one hook site share, for each pair not yet measured or whose
    precompute changed since: what the precompute does unless `precompute.overlaps = false`."""
    from sqlalchemy import select

    from clipscope.db.models import Sae, SaeStatus
    from clipscope.db.session import session_scope
    from clipscope.inventory import sae_row
    from worker.precompute.overlaps import update_overlaps

    ctx = _setup()
    with session_scope(ctx.database_url) as session:
        if keys:
            rows = [sae_row(session, key) for key in keys]  # every key checked before anything is measured
            if not_ready := [f"{r.key} ({r.status})" for r in rows if r.status != SaeStatus.READY]:
                raise ClipScopeError(f"Nothing measured: only a ready SAE has features to compare; not ready: {', '.join(not_ready)}.")
            keys = [r.key for r in rows]
        else:
            keys = list(session.scalars(select(Sae.key).where(Sae.status == SaeStatus.READY).order_by(Sae.id)))
    if not keys:
        typer.echo("no ready SAEs yet (`clipscope run CONFIG` makes one)")
        return
    for key in keys:
        measured = update_overlaps(ctx, key)
        typer.echo(f"{key}: " + (f"measured against {', '.join(measured)}" if measured else "every pair at its site current"))


@users_app.command("add")
def users_add(
    username: str = typer.Argument(..., help="Login name (also the author of this user's labels)."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from standard input."),
) -> None:
    """Add a user who may log in and label (password hashed with scrypt)."""
    from clipscope.accounts import add_user
    from clipscope.db.session import session_scope

    password = sys.stdin.readline().rstrip("\n") if password_stdin else typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    ctx = _setup()
    try:
        with session_scope(ctx.database_url) as session:
            add_user(session, username, password)
    except ValueError as exc:
        raise ClipScopeError(str(exc)) from None
    typer.echo(f"added user {username.strip()}")


@users_app.command("list")
def users_list() -> None:
    """List the users."""
    from sqlalchemy import select

    from clipscope.db.models import User
    from clipscope.db.session import session_scope

    with session_scope(_setup().database_url) as session:
        for name in session.scalars(select(User.username).order_by(User.username)):
            typer.echo(name)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target Alembic revision.")) -> None:
    """Apply database migrations (a step of its own; web workers never migrate)."""
    from clipscope.db.migrate import upgrade
    from clipscope.settings import get_settings

    url = get_settings().resolved_database_url
    upgrade(url, revision)
    typer.echo(f"database at {revision}: {url}")


@db_app.command("vacuum")
def db_vacuum() -> None:
    """Give the space of removed rows (`clipscope saes remove`) back to the file system: SQLite rewrites its
    file (as much free disk as the file needs, meanwhile); PostgreSQL runs VACUUM FULL, locking each table while it rewrites it."""
    from clipscope.db.vacuum import sqlite_bytes, sqlite_file, vacuum
    from clipscope.inventory import human_bytes

    url = _setup().database_url
    path = sqlite_file(url)
    before = sqlite_bytes(path) if path else None
    vacuum(url)
    if path:
        typer.echo(f"vacuumed {path}: {human_bytes(before)} -> {human_bytes(sqlite_bytes(path))} (with its write-ahead log)")
    else:
        typer.echo("vacuumed the database")


def main() -> None:
    """The console entry point. A usage error (a missing argument, an unknown option or choice, a file
    that does not exist) is typer's message and exit code 2; a ``ClipScopeError`` (a bad config or
    setting, missing data or weights, an unmigrated database), a database that cannot be reached and a
    file or folder that cannot be used (no permission, no such folder, a full disk) are one line on
    stderr and exit code 2."""
    try:
        app()
    except ClipScopeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except OperationalError as exc:
        from sqlalchemy.engine import make_url

        from clipscope.settings import get_settings

        url = make_url(get_settings().resolved_database_url).render_as_string()  # the password hidden
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        typer.echo(f"error: Cannot use the database {url}: {reason}", err=True)
        raise SystemExit(2) from None
    except OSError as exc:
        if exc.filename is None:  # not about a file: a bug to see whole
            raise
        typer.echo(f"error: {exc.strerror}: {exc.filename}", err=True)
        raise SystemExit(2) from None
