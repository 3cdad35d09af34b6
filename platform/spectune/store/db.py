"""Engines, migrations and the `Store` object.

    store = connect()                      # $SPECTUNE_DB or ~/.cache/spectune/spectune.db
    store = connect("postgresql+psycopg://user:pw@host/db")

`connect` checks the database answers (3 s connect timeout on PostgreSQL), brings the
schema to the newest Alembic revision and returns a `Store`; any failure is one
`StoreUnavailable` with the password masked.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy.orm import Session, sessionmaker

from spectune.paths import cache_dir
from spectune.store.errors import StoreUnavailable
from spectune.store.reader import StoreReader
from spectune.store.writer import StoreWriter

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
PG_CONNECT_TIMEOUT_S = 3
_MIGRATION_LOCK = threading.Lock()


def default_url() -> str:
    """$SPECTUNE_DB, else spectune.db in the cache folder ($SPECTUNE_CACHE or ~/.cache/spectune)."""
    return os.environ.get("SPECTUNE_DB") or f"sqlite:///{cache_dir('spectune.db')}"


def resolve_url(url: str | None = None) -> str:
    """``url``, else $SPECTUNE_DB, else the default SQLite file. A bare path means SQLite;
    ``postgresql://`` / ``postgres://`` select the psycopg (3) driver."""
    url = url or default_url()
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe for messages and logs)."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<invalid database URL>"


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own transaction handling commits before DDL; let SQLAlchemy emit BEGIN
    # (see _sqlite_begin) so that migrations are transactional like on PostgreSQL.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (dashboard) never block the writer
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    # IMMEDIATE (migrations, writes) takes the write lock up front, waiting up to the busy
    # timeout for another writer, instead of failing when a read turns into a write.
    conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")


def make_engine(url: str | None = None) -> sa.Engine:
    """An engine for ``url`` (see `resolve_url`). SQLite: parent folder created, WAL mode,
    foreign keys on. PostgreSQL: fast connect timeout, pre-ping on checkout."""
    u = sa.make_url(resolve_url(url))
    if u.get_backend_name() == "sqlite":
        db = u.database or ""
        if db and db != ":memory:" and not db.startswith("file:"):
            path = Path(db).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            u = u.set(database=str(path))
        engine = sa.create_engine(u, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_connect)
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    if u.get_backend_name() == "postgresql":
        return sa.create_engine(u, pool_pre_ping=True,
                                connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
    raise ValueError(f"unsupported database {u.get_backend_name()!r}: use sqlite or postgresql")


def alembic_config(url: str | None = None, connection: sa.Connection | None = None) -> Config:
    """An Alembic Config for the packaged migrations (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", resolve_url(url).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` in one transaction (concurrent callers wait)."""
    # Alembic's `context` is process-global: one migration per process at a time. Across
    # processes the database serialises them (IMMEDIATE on SQLite, an advisory lock on
    # PostgreSQL, see migrations/env.py).
    with _MIGRATION_LOCK, engine.connect() as conn, \
            conn.execution_options(sqlite_begin="IMMEDIATE").begin():
        command.upgrade(alembic_config(engine.url.render_as_string(False), conn), revision)


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())
    return text or type(orig).__name__


class Store(StoreWriter, StoreReader):
    """The results store: one engine, sessions per call. Methods: `StoreWriter`, `StoreReader`."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.url = mask_url(engine.url.render_as_string(hide_password=False))
        self.sessions: sessionmaker[Session] = sessionmaker(engine, expire_on_commit=False)
        # A deferred SQLite transaction that reads and then writes fails at once ("database
        # is locked") when another process wrote meanwhile; IMMEDIATE waits for the lock.
        self.writes: sessionmaker[Session] = sessionmaker(
            engine.execution_options(sqlite_begin="IMMEDIATE"), expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url})"


def connect(url: str | None = None, *, migrate: bool = True) -> Store:
    """A `Store` on ``url`` (default: $SPECTUNE_DB or the SQLite file), schema at head.

    Raises `StoreUnavailable` (one line, password masked) when the database cannot be
    reached, the URL is invalid, or the schema cannot be brought up to date.
    """
    resolved = resolve_url(url)
    masked = mask_url(resolved)
    try:
        engine = make_engine(resolved)
    except (sa.exc.ArgumentError, ValueError, ImportError, OSError) as exc:
        raise StoreUnavailable(masked, _reason(exc)) from exc
    try:
        if migrate:
            upgrade(engine)
        else:
            with engine.connect():
                pass
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        engine.dispose()
        raise StoreUnavailable(masked, _reason(exc)) from exc
    except CommandError as exc:
        engine.dispose()
        raise StoreUnavailable(masked, f"schema migration failed: {exc}") from exc
    return Store(engine)
