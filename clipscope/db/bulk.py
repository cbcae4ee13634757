"""Many rows into one table inside a session's transaction: the precompute's features and examples, a
bundle's rows.

On PostgreSQL through ``COPY ... FROM STDIN``: SQLAlchemy's executemany goes through psycopg's
pipeline, one prepared INSERT per row, and a precompute's 676,000 examples took most of 25 s that
way (its "insertmanyvalues", one INSERT of many rows, 70 s); ``COPY`` streams them in one statement.
Elsewhere (SQLite) SQLAlchemy's executemany in chunks, which hands the rows to SQLite's own loop.
"""

from __future__ import annotations

from itertools import chain, islice
from typing import Any, Iterable

from sqlalchemy import JSON, BigInteger, Boolean, Float, Integer, LargeBinary, String, Table, Text
from sqlalchemy.orm import Session

from clipscope.db.session import json_dumps

CHUNK = 50_000
"""Rows per executemany (SQLite): memory stays bounded for millions of rows."""

_COPYABLE = {Integer, BigInteger, Float, Boolean, String, Text, LargeBinary, JSON}
"""Column types (exactly these: not an Enum, which is a String, nor a TypeDecorator) whose values
``COPY`` stores as an INSERT would: psycopg writes the Python value, JSON's as :func:`json_dumps` text."""


def _copyable(table: Table, columns: list[str]) -> bool:
    return all(type(table.c[c].type) in _COPYABLE for c in columns)


def insert_rows(session: Session, table: Table, rows: Iterable[dict[str, Any]]) -> int:
    """Insert ``rows`` (dicts with the same keys, column names of ``table``) in the session's transaction;
    returns how many. A JSON column's value is written as SQLAlchemy's JSON type writes it (None as JSON
    null); a table with a column of another type (a date, say) goes through executemany on PostgreSQL too."""
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return 0
    columns = list(first)
    conn = session.connection()
    if conn.dialect.name != "postgresql" or not _copyable(table, columns):
        n, chunk = 0, [first]
        while True:
            chunk += islice(rows, CHUNK - len(chunk))
            if not chunk:
                return n
            conn.execute(table.insert(), chunk)
            n, chunk = n + len(chunk), []
    as_json = [type(table.c[c].type) is JSON for c in columns]
    quoted = ", ".join(conn.dialect.identifier_preparer.quote(c) for c in columns)
    n = 0
    with conn.connection.driver_connection.cursor() as cursor:  # the session's own connection and transaction
        with cursor.copy(f"COPY {conn.dialect.identifier_preparer.format_table(table)} ({quoted}) FROM STDIN") as copy:
            for row in chain([first], rows):
                copy.write_row([json_dumps(row[c]) if j else row[c] for c, j in zip(columns, as_json)])
                n += 1
    return n

