from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from clipscope.db import migrate
from clipscope.db.models import Base
from clipscope.db.session import get_engine


def test_migrations_build_exactly_the_models_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate.upgrade(url)
    with get_engine(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert migrate.current_revision(url) == migrate.head_revision()


def test_an_unmigrated_database_is_refused_with_the_command_to_run(tmp_path):
    import pytest

    from clipscope.errors import ClipScopeError

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(ClipScopeError, match="clipscope db upgrade"):
        migrate.require_current(url)
    migrate.upgrade(url)
    migrate.require_current(url)
    assert {"saes", "training_points"} <= set(inspect(get_engine(url)).get_table_names())
