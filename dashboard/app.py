"""spectune's dashboard: which speculative-decoding configuration to serve on this hardware.

    spectune dashboard [--db URL] [--port 8501]        # or: streamlit run dashboard/app.py

Reads the results store named by $SPECTUNE_DB (the store's default SQLite file when unset).
Read-only on the store except for "Serve this configuration".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
import streamlit as st

from spectune.dashboard import data, views
from spectune.dashboard.live import DEFAULT_ENDPOINT
from spectune.store import StoreUnavailable, SweepSummary

REFRESH_CHOICES_S = (0, 2, 5, 10, 30)
DEFAULT_REFRESH_S = 5
QUERY_FAILED = "A query on the results database failed"


def _reason(exc: sa.exc.SQLAlchemyError) -> str:
    return " ".join(str(getattr(exc, "orig", None) or exc).split())


def guarded(render: Callable[..., None]) -> Callable[..., None]:
    """``render(url, ...)`` that shows the database error instead of a traceback when the
    store goes away while the page is open (a live refresh keeps retrying)."""
    @functools.wraps(render)  # same qualname: a fragment keeps its identity across reruns
    def run(url: str, *args: Any) -> None:
        try:
            render(url, *args)
        except StoreUnavailable as exc:
            views.unreachable(exc.url, exc.reason)
        except sa.exc.SQLAlchemyError as exc:
            views.unreachable(data.masked(url), _reason(exc), QUERY_FAILED)
    return run


def _refresh_label(seconds: int) -> str:
    return "off" if seconds == 0 else f"every {seconds} s"


def sidebar(url: str, summaries: list[SweepSummary]) -> tuple[SweepSummary | None, int, str]:
    """The sweep picker, live refresh and endpoint settings: (sweep, refresh seconds, endpoint)."""
    st.sidebar.markdown("## spectune")
    st.sidebar.caption(f"store: `{data.masked(url)}`")
    picked = None
    if summaries:
        by_name = {s.name: s for s in summaries}
        name = st.sidebar.selectbox("Sweep", list(by_name), key="sweep",
                                    format_func=lambda n: views.sweep_label(by_name[n]))
        picked = by_name[name]
        counts = " · ".join(f"{n} {status}" for status, n in picked.n_trials.items() if n)
        st.sidebar.caption(f"{counts or 'no trials'}  \n"
                           f"started {views.when(picked.started_at)}  \n"
                           f"{picked.hardware or 'hardware not recorded yet'}")
    refresh_s = st.sidebar.select_slider("Live refresh", REFRESH_CHOICES_S,
                                         value=DEFAULT_REFRESH_S, key="refresh_s",
                                         format_func=_refresh_label,
                                         help="How often a running sweep's view reloads")
    if picked is not None and picked.status == "running" and refresh_s:
        st.sidebar.caption(f":blue[●] live: refreshing every {refresh_s} s while the sweep runs")
    if st.sidebar.button("Reload now", icon=":material/refresh:"):
        data.refresh()
    st.sidebar.divider()
    endpoint = st.sidebar.text_input("Live endpoint", DEFAULT_ENDPOINT, key="endpoint",
                                     help="Where `spectune serve` listens (Try it live tab)")
    return picked, refresh_s, endpoint


def main() -> None:
    st.set_page_config(page_title="spectune · Pareto fronts", page_icon=":material/speed:",
                       layout="wide")
    url = data.database_url()
    try:
        summaries = data.sweeps(url)
    except StoreUnavailable as exc:
        st.title("spectune")
        views.unreachable(exc.url, exc.reason)
        return
    except sa.exc.SQLAlchemyError as exc:  # reachable, then failed mid-query
        st.title("spectune")
        views.unreachable(data.masked(url), _reason(exc), QUERY_FAILED)
        return
    sweep, refresh_s, endpoint = sidebar(url, summaries)
    if sweep is None:
        st.title("spectune")
        views.empty_store(data.masked(url))
        return
    with st.expander(f"All sweeps ({len(summaries)})"):
        st.dataframe(views.sweeps_overview(summaries), hide_index=True, width="stretch")
    front_tab, compare_tab, live_tab = st.tabs(
        ["Pareto front & trials", "Compare sweeps", "Try it live"])
    with front_tab:
        live_every = refresh_s if sweep.status == "running" and refresh_s else None
        st.fragment(guarded(views.sweep_view), run_every=live_every)(url, sweep.name)
    with compare_tab:
        st.fragment(guarded(views.compare_view))(url, summaries, sweep.name)
    with live_tab:
        st.fragment(views.live_panel)(endpoint)


main()
