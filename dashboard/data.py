"""The dashboard's reads from the results store, cached the way Streamlit means them to be.

The `Store` (an engine with its connection pool) is a `st.cache_resource`: one per
database URL for the whole server. Queries are `st.cache_data` with a short TTL, so a
running sweep's new trials show up on the next live refresh without every widget click
hitting the database. A store that cannot be reached raises `StoreUnavailable`, which
Streamlit does not cache: the next rerun tries again.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from spectune.store import Store, SweepSummary, connect, mask_url, resolve_url

QUERY_TTL_S = 2.0  # below the shortest live-refresh interval, so each refresh sees new rows


def database_url() -> str:
    """The URL the app reads: $SPECTUNE_DB (set by `spectune dashboard --db`), else the
    store's default SQLite file."""
    return resolve_url(None)


def masked(url: str) -> str:
    return mask_url(url)


@st.cache_resource(show_spinner=False)
def store_for(url: str) -> Store:
    return connect(url)


@st.cache_data(ttl=QUERY_TTL_S, show_spinner=False)
def sweeps(url: str) -> list[SweepSummary]:
    return store_for(url).list_sweeps()


@st.cache_data(ttl=QUERY_TTL_S, show_spinner=False)
def trials(url: str, sweep_names: tuple[str, ...]) -> pd.DataFrame:
    return store_for(url).trials_frame(list(sweep_names))


@st.cache_data(ttl=QUERY_TTL_S, show_spinner=False)
def trial_detail(url: str, trial_id: int) -> dict[str, Any]:
    return store_for(url).trial_detail(trial_id)


@st.cache_data(ttl=QUERY_TTL_S, show_spinner=False)
def served_trial(url: str) -> int | None:
    return store_for(url).served_trial()


def serve_trial(url: str, trial_id: int) -> None:
    """Make ``trial_id`` the configuration the live endpoint serves (the dashboard's one
    write), then drop cached reads so every view shows it at once."""
    store_for(url).mark_served(trial_id)
    refresh()


def refresh() -> None:
    sweeps.clear()
    trials.clear()
    trial_detail.clear()
    served_trial.clear()


__all__ = ["QUERY_TTL_S", "database_url", "masked", "refresh", "serve_trial", "served_trial",
           "store_for", "sweeps", "trial_detail", "trials"]
