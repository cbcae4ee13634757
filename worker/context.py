"""What every stage needs: settings, the data-dir layout, the device and the database URL."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from clipscope.db import migrate
from clipscope.settings import Settings, get_settings
from clipscope.storage import DataLayout


@dataclass
class Context:
    settings: Settings

    @classmethod
    def from_env(cls) -> "Context":
        return cls(get_settings())

    @cached_property
    def layout(self) -> DataLayout:
        return DataLayout(self.settings.data_dir)

    @cached_property
    def device(self) -> str:
        return self.settings.resolved_device()

    @cached_property
    def database_url(self) -> str:
        """The database, checked to be at the code's schema revision.

        The embedded SQLite default is migrated on first use (one user, one file); any other
        database must be migrated as its own step (`clipscope db upgrade`) and is only checked.
        """
        url = self.settings.resolved_database_url
        if url.startswith("sqlite") and self.settings.database_url is None:
            migrate.upgrade(url)
        else:
            migrate.require_current(url)
        return url
