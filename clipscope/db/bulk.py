"""Many rows into one table inside a session's transaction: the precompute's features and examples, a
bundle's rows (docs/benchmarks.md, the precompute's write).

- PostgreSQL: ``COPY ... FROM STDIN``. SQLAlchemy's executemany goes through psycopg's pipeline, one
  prepared INSERT a row, and a precompute's 676,000 examples took most of 25 s that way (its
  "insertmanyvalues", one INSERT of many rows, 70 s).
- SQLite: the driver's own ``executemany`` over tuples that the column types' bind processors made,
  as SQLAlchemy's executemany makes them, without its per-row work around them (~1 s of 12).

A table with a column of another type (a date, an Enum: a TypeDecorator or a subclass converts its
values in ways a plain value does not show) goes through SQLAlchemy's executemany on either engine.
"""

from __future__ import annotations

from itertools import chain, islice
from typing import Any, Iterable, Iterator

from sqlalchemy import JSON, BigInteger, Boolean, Float, Integer, LargeBinary, String, Table, Text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from clipscope.db.session import json_dumps

CHUNK = 50_000
"""Rows per executemany: memory stays bounded for millions of rows."""

_PLAIN = {Integer, BigInteger, Float, Boolean, String, Text, LargeBinary, JSON}
"""Column types (exactly these) whose values go to the driver as they are, JSON's as :func:`json_dumps` text."""


def insert_rows(session: Session, table: Table, rows: Iterable[dict[str, Any]]) -> int:
    """Insert ``rows`` (dicts with the same keys, column names of ``table``) in the session's transaction;
    returns how many. Every value is stored as SQLAlchemy's INSERT stores it (a JSON column's None as JSON null)."""
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return 0
    rows, columns, conn = chain([first], rows), list(first), session.connection()
    if not all(type(table.c[c].type) in _PLAIN for c in columns):
        return _executemany(conn, table.insert(), rows)
    if conn.dialect.name == "postgresql":
        return _copy(conn, table, columns, rows)
    dialect = conn.dialect
    processors = [table.c[c].type.dialect_impl(dialect).bind_processor(dialect) or _same for c in columns]
    sql = f"INSERT INTO {_table(conn, table)} ({_quoted(conn, columns)}) VALUES ({', '.join('?' * len(columns))})"
    return _executemany(conn, sql, (tuple([p(row[c]) for p, c in zip(processors, columns)]) for row in rows))


def _copy(conn: Connection, table: Table, columns: list[str], rows: Iterator[dict]) -> int:
    as_json = [type(table.c[c].type) is JSON for c in columns]
    n = 0
    with conn.connection.driver_connection.cursor() as cursor:  # the session's own connection and transaction
        with cursor.copy(f"COPY {_table(conn, table)} ({_quoted(conn, columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([json_dumps(row[c]) if j else row[c] for c, j in zip(columns, as_json)])
                n += 1
    return n


def _executemany(conn: Connection, statement, rows: Iterator) -> int:
    """``statement`` (a Core insert over dicts, or the driver's SQL over tuples) in chunks of :data:`CHUNK`."""
    n = 0
    while chunk := list(islice(rows, CHUNK)):
        if isinstance(statement, str):
            conn.exec_driver_sql(statement, chunk)
        else:
            conn.execute(statement, chunk)
        n += len(chunk)
    return n


def _same(value: Any) -> Any:
    return value


def _table(conn: Connection, table: Table) -> str:
    return conn.dialect.identifier_preparer.format_table(table)


def _quoted(conn: Connection, columns: list[str]) -> str:
    return ", ".join(conn.dialect.identifier_preparer.quote(c) for c in columns)
