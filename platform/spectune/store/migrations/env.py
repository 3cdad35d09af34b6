"""Alembic environment for the results store.

`spectune.store.db.connect()` runs `upgrade head` with its own connection (passed in
``config.attributes["connection"]``). For development, `spectune.store.db.alembic_config(url)`
gives a Config usable with `alembic.command.*` (e.g. `revision(cfg, autogenerate=True)`).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from spectune.store.schema import Base

# Any constant works; all migrators of one PostgreSQL database agree on it.
_PG_MIGRATION_LOCK = 0x5EC7_0001

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs: object) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kwargs)


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: sa.Connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Two processes connecting to a fresh database must not both create tables.
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from spectune.store.db import make_engine

    engine = make_engine(config.get_main_option("sqlalchemy.url") or None)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
