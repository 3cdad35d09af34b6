"""Alembic revisions of the results store."""
