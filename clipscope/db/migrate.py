"""Run Alembic migrations programmatically (``clipscope db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from clipscope.db.session import get_engine
from clipscope.errors import ClipScopeError

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url)
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def require_current(url: str) -> None:
    """Fail clearly when the database is behind the code (the web never migrates by itself)."""
    current, head = current_revision(url), head_revision()
    if current != head:
        raise ClipScopeError(
            f"The database at {url} is at revision {current or 'none'}, the code needs {head}: run `clipscope db upgrade`."
        )
