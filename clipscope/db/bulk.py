"""Many rows into one table inside a session's transaction: the precompute's features and examples, a
bundle's rows (docs/benchmarks.md, the precompute's write).

- PostgreSQL: ``COPY ... FROM STDIN``. SQLAlchemy's executemany goes through psycopg's pipeline, one
  prepared INSERT a row, and a precompute's 676,000 examples took most of 25 s that way (its
  "insertmanyvalues", one INSERT of many rows, 70 s).
- SQLite: the driver's own ``executemany`` over tuples whose values the column types' bind processors
  converted, as SQLAlchemy's executemany converts them, without its per-row work around them.

Rows come as dicts (:func:`insert_rows`) or as one sequence of values per column (:func:`insert_columns`,
what arrays give for free). Either way the values are converted a column at a time, in chunks of
:data:`CHUNK` rows: only the columns whose type has a converter (JSON, Float, Boolean on SQLite) are touched.

A table with a column of another type (a date, an Enum: a TypeDecorator or a subclass converts its
values in ways a plain value does not show) goes through SQLAlchemy's executemany on either engine.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from itertools import chain, islice
from operator import itemgetter
from typing import Any, Iterable, Iterator, Sequence

from sqlalchemy import JSON, BigInteger, Boolean, Float, Integer, LargeBinary, String, Table, Text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from clipscope.db.session import json_dumps

CHUNK = 50_000
"""Rows converted and handed to the driver at a time: memory stays bounded for millions of rows."""

_PLAIN = {Integer, BigInteger, Float, Boolean, String, Text, LargeBinary, JSON}
"""Column types (exactly these) whose values go to the driver as they are, JSON's as :func:`json_dumps` text."""


def insert_rows(session: Session, table: Table, rows: Iterable[dict[str, Any]]) -> int:
    """Insert ``rows`` (dicts with the same keys, column names of ``table``) in the session's transaction;
    returns how many. Every value is stored as SQLAlchemy's INSERT stores it (a JSON column's None as JSON null)."""
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return 0
    names = list(first)
    get = itemgetter(*names) if len(names) > 1 else lambda row: (row[names[0]],)
    return _insert(session.connection(), table, names, map(get, chain([first], rows)))


def insert_columns(session: Session, table: Table, columns: dict[str, Sequence[Any]]) -> int:
    """:func:`insert_rows` for rows given column by column: ``columns`` maps column names of ``table`` to
    sequences of one length (lists, or arrays and tensors, which are read through their ``tolist()``), row
    ``i`` made of every sequence's ``i``-th value; returns how many rows."""
    columns = {name: values.tolist() if hasattr(values, "tolist") else values for name, values in columns.items()}
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns of unequal lengths: {lengths}")
    if not lengths or not next(iter(lengths.values())):
        return 0
    return _insert(session.connection(), table, list(columns), zip(*columns.values()))


def analyze(session: Session, *tables: Table) -> None:
    """PostgreSQL: fresh planner statistics of ``tables`` inside the session's transaction (its own new rows
    counted, published with the commit): before the rows whose foreign keys point into them go in, and
    after a large write, for the pages that read it next.

    A table analysed while it held pages but no live rows (after an SAE's rows were deleted, or during a
    write that was then rolled back) reads as empty, and the foreign-key check of each new example was
    planned through an index that only starts with the SAE, reading all of its features: the seed recipe's
    write ran for over 8 minutes instead of 12 s (docs/benchmarks.md). Likewise a list page's 300 examples,
    read before autovacuum came round to the new rows, went through the index of (SAE, bucket, rank) and
    filtered 295,000 entries: 78 ms instead of ~3 ms at 49,152 features. ANALYZE samples at most 30,000
    rows and takes a lock that blocks neither readers nor writers. The transaction's rows still count as
    changed since the analysis once it commits (PostgreSQL adds them to the table's counter afterwards),
    so autovacuum analyses the table once more later: the same statistics, a fraction of a second.
    SQLite: nothing to do (its checks use the parent's key, and its planner needs no statistics for
    these reads).
    """
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"ANALYZE {', '.join(_table(conn, t) for t in tables)}")


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (as it was after it; nested blocks keep it off).

    Building a precompute's rows makes millions of dicts and lists that stay alive until they are
    written, and allocations keep triggering collections that walk every one of them: ~4 s of the seed
    recipe's ~13 s write (a bundle's export and import: ~3-6 s). Those rows form no cycles, so
    reference counting still frees all of them.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _insert(conn: Connection, table: Table, names: list[str], rows: Iterator[tuple]) -> int:
    if not all(type(table.c[c].type) in _PLAIN for c in names):
        return _executemany(conn, table.insert(), (dict(zip(names, row)) for row in rows))
    if conn.dialect.name == "postgresql":
        convert = [json_dumps if type(table.c[c].type) is JSON else None for c in names]
        return _copy(conn, table, names, _converted(rows, convert))
    dialect = conn.dialect
    convert = [table.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in names]
    sql = f"INSERT INTO {_table(conn, table)} ({_quoted(conn, names)}) VALUES ({', '.join('?' * len(names))})"
    n = 0
    for chunk in _converted(rows, convert):
        conn.exec_driver_sql(sql, chunk)
        n += len(chunk)
    return n


def _converted(rows: Iterator[tuple], convert: list) -> Iterator[list[tuple]]:
    """Chunks of ``rows`` with each value passed through its column's converter (None: as it is), a column at a time."""
    touched = [(i, f) for i, f in enumerate(convert) if f is not None]
    while chunk := list(islice(rows, CHUNK)):
        if touched:
            values = list(zip(*chunk))
            for i, f in touched:
                values[i] = map(f, values[i])
            chunk = list(zip(*values))
        yield chunk


def _copy(conn: Connection, table: Table, names: list[str], chunks: Iterator[list[tuple]]) -> int:
    n = 0
    with conn.connection.driver_connection.cursor() as cursor:  # the session's own connection and transaction
        with cursor.copy(f"COPY {_table(conn, table)} ({_quoted(conn, names)}) FROM STDIN") as copy:
            for chunk in chunks:
                for row in chunk:
                    copy.write_row(row)
                n += len(chunk)
    return n


def _executemany(conn: Connection, statement, rows: Iterator[dict]) -> int:
    """SQLAlchemy's executemany of ``statement`` (a Core insert) over ``rows``, in chunks of :data:`CHUNK`."""
    n = 0
    while chunk := list(islice(rows, CHUNK)):
        conn.execute(statement, chunk)
        n += len(chunk)
    return n


def _table(conn: Connection, table: Table) -> str:
    return conn.dialect.identifier_preparer.format_table(table)


def _quoted(conn: Connection, columns: list[str]) -> str:
    return ", ".join(conn.dialect.identifier_preparer.quote(c) for c in columns)
