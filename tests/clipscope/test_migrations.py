import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from clipscope.db import migrate
from clipscope.db.models import Base
from clipscope.db.session import get_engine
from clipscope.errors import ClipScopeError


def test_migrations_build_exactly_the_models_schema_on_both_engines(db_url):
    with get_engine(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert migrate.current_revision(db_url) == migrate.head_revision()


def test_migrations_downgrade_to_nothing_and_up_again(db_url):
    migrate_down = __import__("alembic.command", fromlist=["downgrade"]).downgrade
    migrate_down(migrate.alembic_config(db_url), "base")
    assert set(inspect(get_engine(db_url)).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(db_url)
    assert {"saes", "features", "feature_examples", "labels", "label_revisions", "images"} <= set(
        inspect(get_engine(db_url)).get_table_names()
    )


def test_an_unmigrated_database_is_refused_with_the_command_to_run(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(ClipScopeError, match="clipscope db upgrade"):
        migrate.require_current(url)
    migrate.upgrade(url)
    migrate.require_current(url)
