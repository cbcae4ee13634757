"""Give the space of deleted rows back to the file system (``clipscope db vacuum``)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from clipscope.db.session import get_engine


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite database URL; None for another engine or an in-memory database."""
    engine = get_engine(url)
    name = engine.url.database
    return Path(name) if engine.dialect.name == "sqlite" and name and name != ":memory:" else None


def sqlite_bytes(path: Path) -> int:
    """The bytes an SQLite database takes: its file and its write-ahead log (where recent writes wait)."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def vacuum(url: str) -> None:
    """SQLite: ``VACUUM`` rewrites the file without its free pages (it needs as much free disk as the file,
    and waits for no reader in WAL mode but for no other writer). PostgreSQL: ``VACUUM FULL`` rewrites
    each table, holding an exclusive lock on it while it does (pages wait meanwhile)."""
    engine = get_engine(url)
    statement = "VACUUM" if engine.dialect.name == "sqlite" else "VACUUM FULL ANALYZE"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(statement))
        if engine.dialect.name == "sqlite":
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
