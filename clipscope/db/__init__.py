"""Database schema (SQLAlchemy 2.0), engine/session helpers and migrations runner."""
