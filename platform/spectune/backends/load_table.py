"""Speculation under load (backends that measure under load, such as vLLM) as tables: where does speculation stop paying?

Plotly-free computations over the store's trials frame, one trial per (configuration, concurrency)
point, shared by `spectune results` and the dashboard's load section (`spectune.dashboard.load_view`,
which draws them):

    served_rows        finished trials measured under load, each with its configuration label
    best_per_load      the fastest configuration at each load (a table)
    speedup_table      configurations x loads
    on_latency_front   per load, the trials no other beats on both throughput and p95 latency
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pandas as pd

from spectune.backends.registry import BACKENDS
from spectune.config import DecodeConfig
from spectune.pareto import pareto_front

LATENCY_FRONT = {"tokens_per_s": "max", "p95_latency_s": "min"}


def served_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Finished trials measured under load (by a backend that declares it measures under load)."""
    if "backend" not in df.columns:
        return df.iloc[0:0]
    served = BACKENDS.names_where(lambda backend: backend.under_load)
    done = df[(df["status"] == "done") & df["backend"].isin(served)]
    return done.assign(configuration=[configuration_label(c, m, b) for c, m, b in
                                      zip(done["config"], done["method"], done["backend"])])


def configuration_label(config: Any, method: Any, backend: Any) -> str:
    """The configuration's one label without its load (`vllm:ngram(num_speculative_tokens=3)`)."""
    flat = dict(config) if isinstance(config, dict) else {}
    flat.setdefault("method", method or "?")
    flat.setdefault("backend", backend)
    return replace(DecodeConfig.from_dict(flat), concurrency=1).label()


def on_latency_front(df: pd.DataFrame) -> pd.Series:
    """Per load: trials no other trial at that load beats on both throughput and p95 latency."""
    rows = served_rows(df).dropna(subset=["tokens_per_s", "p95_latency_s"])
    marks = [pareto_front(group, LATENCY_FRONT, include_unchecked=True) for _, group in rows.groupby("concurrency")]
    return pd.concat(marks) if marks else pd.Series(dtype=bool)


def best_per_load(df: pd.DataFrame) -> pd.DataFrame:
    """The configuration with the highest speedup at each load, beside no speculation's tokens/s."""
    rows = served_rows(df).dropna(subset=["speedup"])
    if rows.empty:
        return pd.DataFrame(columns=["concurrency", "best configuration", "speedup", "tok/s", "p95 latency (s)"])
    best = rows.sort_values(["concurrency", "speedup", "trial_id"], ascending=[True, False, True])
    best = best.groupby("concurrency", as_index=False).first()
    return pd.DataFrame({"concurrency": best["concurrency"].astype(int), "best configuration": best["configuration"],
                         "speedup": best["speedup"].round(3), "tok/s": best["tokens_per_s"].round(1),
                         "p95 latency (s)": best["p95_latency_s"].round(3), "trial": best["trial_id"]})


def speedup_table(df: pd.DataFrame) -> pd.DataFrame:
    """Speedup of every configuration (rows) at every load (columns): the sweep's answer in one table."""
    rows = served_rows(df).dropna(subset=["speedup"])
    if rows.empty:
        return pd.DataFrame()
    table = rows.pivot_table(index="configuration", columns="concurrency", values="speedup", aggfunc="first")
    table.columns = [f"c={int(c)}" for c in table.columns]
    return table
