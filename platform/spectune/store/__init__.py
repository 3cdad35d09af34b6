"""The results store: sweeps, trials, metrics, per-prompt results, hardware, AR baselines.

SQLAlchemy 2.0 ORM (`schema`), Alembic migrations shipped in the package (`migrations`),
SQLite by default and PostgreSQL by URL. Only the sweep driver writes; the dashboard
and the endpoint read.

    from spectune.store import connect
    store = connect()                 # or connect("postgresql+psycopg://...")
    store.create_sweep("demo", spec)
    store.upsert_trial("demo", trial_id, config, "running")
    store.record_result("demo", trial_id, metrics, hardware)
    df = store.trials_frame("demo")
"""

from spectune.store._sql import hardware_summary
from spectune.store.db import (
    Store, default_url, alembic_config, connect, make_engine, mask_url, resolve_url, upgrade,
)
from spectune.store.errors import (
    StoreError, StoreUnavailable, SweepExists, UnknownSweep, UnknownTrial,
)
from spectune.store.reader import FRAME_COLUMNS, NUMERIC_METRICS, BaselineRow, SweepRow, SweepSummary

__all__ = [
    "FRAME_COLUMNS", "NUMERIC_METRICS", "BaselineRow", "Store", "StoreError",
    "StoreUnavailable", "SweepExists", "SweepRow", "SweepSummary", "UnknownSweep", "UnknownTrial",
    "alembic_config", "connect", "default_url", "hardware_summary", "make_engine", "mask_url", "resolve_url",
    "upgrade",
]
