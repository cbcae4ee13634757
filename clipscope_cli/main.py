"""``clipscope``: one command with a subcommand per stage."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from clipscope.config import load_config
from clipscope.errors import ClipScopeError

if TYPE_CHECKING:
    from worker.context import Context

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train SAEs on CLIP ViT-B/32 and explore their features.")
db_app = typer.Typer(no_args_is_help=True, help="Database maintenance.")
app.add_typer(db_app, name="db")

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
ConfigArg = typer.Argument(..., dir_okay=False, help="Run config (TOML), e.g. configs/seed.toml.")


def _setup() -> "Context":
    """Console logging and the process context (imported late: ``--help`` needs no torch)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    for name in ("clipscope", "worker"):
        logging.getLogger(name).setLevel(logging.INFO)
    from worker.context import Context

    return Context.from_env()


@app.command()
def extract(config: Path = ConfigArg) -> None:
    """Extract CLIP activations at the hooked block into the activation cache (resumes, or reuses)."""
    from worker.pipeline import run_extract

    run_extract(_setup(), load_config(config))


@app.command()
def train(config: Path = ConfigArg) -> None:
    """Train the SAE (extracting first if needed); resumes from the last checkpoint."""
    from worker.pipeline import run_train

    run_train(_setup(), load_config(config))


@app.command()
def evaluate(config: Path = ConfigArg) -> None:
    """Zero-shot accuracy clean vs with the SAE spliced in (training first if needed); prints the table."""
    from worker.pipeline import run_evaluate

    run_evaluate(_setup(), load_config(config))


@app.command()
def precompute(config: Path = ConfigArg) -> None:
    """Per-feature statistics, top and interval examples, neighbours and thumbnails into the database."""
    from worker.pipeline import run_precompute

    run_precompute(_setup(), load_config(config))


@app.command()
def run(config: Path = ConfigArg) -> None:
    """Run every stage of the pipeline in order; finished stages are reused."""
    from worker.pipeline import run_all

    run_all(_setup(), load_config(config))


@app.command()
def demo(config: Path = typer.Option(CONFIGS_DIR / "demo.toml", help="Config of the demo run.")) -> None:
    """The offline demo: synthetic images, random-initialised CLIP, a small SAE, SQLite under the data dir."""
    from worker.pipeline import run_all

    run_all(_setup(), load_config(config))


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target Alembic revision.")) -> None:
    """Apply database migrations (a step of its own; web workers never migrate)."""
    from clipscope.db.migrate import upgrade
    from clipscope.settings import get_settings

    url = get_settings().resolved_database_url
    upgrade(url, revision)
    typer.echo(f"database at {revision}: {url}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except ClipScopeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        raise SystemExit(130) from None
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        raise
