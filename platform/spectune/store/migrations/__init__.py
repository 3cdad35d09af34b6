"""Alembic migration environment of the results store (configured programmatically)."""
