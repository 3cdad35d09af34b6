"""A load sweep's answer as vLLM's own setting: per batch-size band, how many tokens to speculate.

vLLM 0.32 takes `num_speculative_tokens_per_batch_size`, a list of `(first, last, k)` batch-size
bands (k = 0: no speculation in that band), read by its scheduler every step. vLLM ships no
defaults for it; a spectune load sweep measured each configuration at several concurrencies,
so the bands follow from the store:

    families     one method with its knobs but k: the only thing a schedule may vary per band is k
    choose_k     per load, the family's fastest certified k whose speedup interval lies above 1; else 0
    band_edges   each measured load owns the batch sizes nearer to it than to its neighbours (on a log scale)
    derive       the family whose choices are fastest over the loads, as a `LoadSchedule`

Pure over the store's trials frame (no server, no Ray): `spectune vllm schedule` prints it,
`spectune serve --sweep NAME --schedule` serves it, the dashboard draws its bands.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from spectune.backends.load_table import served_rows
from spectune.backends.vllm import NO_SPECULATION, VLLM_METHODS, check_bands
from spectune.config import DecodeConfig
from spectune.lossless import CERTIFIED

BACKEND = "vllm"
K = "num_speculative_tokens"
SCHEDULE = "num_speculative_tokens_per_batch_size"
ENGINE = ("max_num_seqs", "max_num_batched_tokens")  # engine knobs: the server's, not the speculative config's
# vLLM 0.32's max_num_seqs for an OpenAI server on CPU (GPU servers default higher); vLLM carries the
# last band's k on to any larger batch, so this bounds the printed bands, not the behaviour
DEFAULT_MAX_NUM_SEQS = 128


class ScheduleError(ValueError):
    """No schedule can be derived from the sweep; the message names why in one line (malformed bands are
    `backends.vllm.check_bands`' ValueError)."""


@dataclass(frozen=True)
class Band:
    first: int  # batch sizes first..last (inclusive) speculate k tokens
    last: int
    k: int  # 0: no speculation
    measured_at: tuple[int, ...]  # the loads measured inside the band
    speedup: float  # the chosen k's speedup at those loads (their least; 1.0 for k = 0)


@dataclass(frozen=True)
class LoadSchedule:
    method: str
    knobs: Mapping[str, Any]  # the family's knobs but k (and the engine knobs)
    engine: Mapping[str, Any]  # max_num_seqs / max_num_batched_tokens of the family's server
    bands: tuple[Band, ...]
    max_num_seqs: int
    trials: tuple[int, ...]  # the trials the choices rest on

    @property
    def k_max(self) -> int:
        return max(band.k for band in self.bands)

    def per_batch_size(self) -> list[list[int]]:
        return [[band.first, band.last, band.k] for band in self.bands]

    def speculative_config(self) -> dict[str, Any]:
        """What `vllm serve --speculative-config` takes."""
        return {"method": self.method, **self.knobs, K: self.k_max, SCHEDULE: self.per_batch_size()}

    def served_knobs(self) -> dict[str, Any]:
        """The vLLM backend's knobs serving it (`spectune serve --schedule`): the config and the engine knobs."""
        config = self.speculative_config()
        config.pop("method")
        return {**config, **self.engine}

    def to_json(self) -> str:
        return json.dumps(self.speculative_config(), separators=(",", ":"))


# --- pure pieces ---------------------------------------------------------------------------------


def band_edges(loads: Sequence[int], max_num_seqs: int) -> list[tuple[int, int]]:
    """Batch-size bands covering 1..max_num_seqs without gaps, one per measured load (sorted, distinct).

    A load owns the batch sizes up to the geometric mean of it and the next load (speculation's
    cost grows with the batch roughly log-linearly, so 4 and 16 split at 8, not at 10).
    """
    ordered = sorted(set(int(load) for load in loads))
    if len(ordered) < 2:
        raise ScheduleError(f"a schedule needs a sweep measured at two loads at least; it has {ordered or 'none'}")
    if ordered[0] < 1 or ordered[-1] > max_num_seqs:
        raise ScheduleError(f"loads {ordered} must lie within 1..max_num_seqs ({max_num_seqs})")
    lasts = [max(low, math.floor(math.sqrt(low * high))) for low, high in zip(ordered, ordered[1:])]
    firsts = [1] + [last + 1 for last in lasts]
    return list(zip(firsts, [*lasts, max_num_seqs]))


def merge_bands(bands: Sequence[Band]) -> tuple[Band, ...]:
    """Neighbouring bands with the same k become one."""
    merged: list[Band] = []
    for band in bands:
        if merged and merged[-1].k == band.k:
            prev = merged[-1]
            merged[-1] = Band(prev.first, band.last, band.k, prev.measured_at + band.measured_at,
                              min(prev.speedup, band.speedup))
        else:
            merged.append(band)
    return tuple(merged)


@dataclass(frozen=True)
class Choice:
    k: int
    speedup: float
    trial: int | None


def choose_k(points: pd.DataFrame, min_speedup: float = 1.0) -> Choice:
    """Of one family's trials at one load: the fastest k that pays surely (its speedup's interval above
    `min_speedup`, or its speedup where no interval was measured); else no speculation."""
    low = points["speedup_ci_low"].where(points["speedup_ci_low"].notna(), points["speedup"])
    paying = points[low > min_speedup].sort_values(["speedup", "trial_id"], ascending=[False, True])
    if paying.empty:
        return Choice(0, 1.0, None)
    best = paying.iloc[0]
    return Choice(int(best["k"]), float(best["speedup"]), int(best["trial_id"]))


# --- from the store's frame ---------------------------------------------------------------------


def derive(frame: pd.DataFrame, sweep: str, method: str | None = None, max_num_seqs: int | None = None,
           min_speedup: float = 1.0) -> LoadSchedule:
    """The schedule of `sweep`'s fastest family (of `method` when given); ScheduleError naming why none.

    `min_speedup`: what a k's interval must clear to be chosen at a load (1.0: surely faster than no
    speculation; above 1 demands a margin; 0 takes the fastest k everywhere, even where it loses)."""
    rows = _speculating_rows(frame, sweep)
    if method is not None:
        VLLM_METHODS.get(method)  # a name vLLM's registry does not hold: its own one-line error
        rows = rows[rows["method"] == method]
        if rows.empty:
            raise ScheduleError(f"sweep {sweep!r} has no finished {method} trial to schedule")
    loads = sorted(int(c) for c in served_rows(frame[frame["sweep"] == sweep])["concurrency"].unique())
    if len(loads) < 2:
        raise ScheduleError(f"sweep {sweep!r} was measured at {len(loads)} load(s) {loads}: a schedule needs two at least "
                            "(load: {concurrency: [1, 4, 16]} in its spec)")
    candidates = [_family_schedule(sweep, family, group, loads, max_num_seqs, min_speedup)
                  for family, group in rows.groupby("family", sort=True)]
    best = max(candidates, key=_score)
    if best.k_max == 0:
        raise ScheduleError(f"in sweep {sweep!r} no speculative configuration's speedup lies surely above "
                            f"{min_speedup:g} at any load {loads}: serve it without speculation (method ar)")
    return best


def fixed_configurations(frame: pd.DataFrame, sweep: str, schedule: LoadSchedule) -> list[dict[str, Any]]:
    """The knobs of every fixed configuration of the schedule's family that the sweep measured (certified),
    one per k: what the schedule must beat over a changing load (`spectune vllm trace`)."""
    rows = _speculating_rows(frame, sweep)
    family = json.dumps({"method": schedule.method, **schedule.knobs, **schedule.engine}, sort_keys=True)
    ks = sorted({int(k) for k in rows[rows["family"] == family]["k"].dropna()})
    return [{**schedule.knobs, K: k, **schedule.engine} for k in ks]


def _speculating_rows(frame: pd.DataFrame, sweep: str) -> pd.DataFrame:
    """The sweep's finished, certified vLLM trials that speculate, each with its family and k."""
    rows = served_rows(frame[frame["sweep"] == sweep])
    rows = rows[(rows["backend"] == BACKEND) & (rows["method"] != NO_SPECULATION)].dropna(subset=["speedup"])
    if rows.empty:
        raise ScheduleError(f"sweep {sweep!r} has no finished vLLM trial that speculates")
    unchecked = rows[~rows["lossless_status"].isin(CERTIFIED)]
    if len(unchecked) == len(rows):
        first = unchecked.iloc[0]
        raise ScheduleError(f"none of sweep {sweep!r}'s trials is certified (trial {int(first['trial_id'])} is "
                            f"{first['lossless_status'] or 'unchecked'}): a schedule rests on certified trials only")
    rows = rows.drop(unchecked.index)
    configs = [DecodeConfig.from_dict(c if isinstance(c, dict) else {"method": m}) for c, m in zip(rows["config"], rows["method"])]
    return rows.assign(k=[c.knobs.get(K) for c in configs], family=[_family(c) for c in configs])


def _family(config: DecodeConfig) -> str:
    """A method and its knobs but k: what stays fixed across a schedule's bands (a JSON key)."""
    fixed = {key: value for key, value in config.knobs.items() if key not in (K, SCHEDULE)}
    return json.dumps({"method": config.method, **fixed}, sort_keys=True)


def _family_schedule(sweep: str, family: str, rows: pd.DataFrame, loads: list[int],
                     max_num_seqs: int | None, min_speedup: float) -> LoadSchedule:
    described = json.loads(family)
    method = described.pop("method")
    engine = {key: described.pop(key) for key in ENGINE if key in described}
    if rows["k"].isna().any():
        raise ScheduleError(f"{method} trials of sweep {sweep!r} have no {K}: nothing for a schedule to vary")
    seqs = max_num_seqs or engine.get("max_num_seqs") or max(DEFAULT_MAX_NUM_SEQS, loads[-1])
    bands = []
    for (first, last), load in zip(band_edges(loads, seqs), loads):
        choice = choose_k(rows[rows["concurrency"] == load], min_speedup)
        bands.append((Band(first, last, choice.k, (load,), choice.speedup), choice.trial))
    merged = merge_bands([band for band, _ in bands])
    check_bands([[b.first, b.last, b.k] for b in merged], max(b.k for b in merged), seqs)  # (by construction)
    trials = tuple(trial for _, trial in bands if trial is not None)
    return LoadSchedule(method, described, engine, merged, seqs, trials)


def _score(schedule: LoadSchedule) -> tuple[float, int]:
    """Mean log speedup over the measured loads (no speculation counts 1.0); ties: the fewer bands."""
    logs = [math.log(band.speedup) for band in schedule.bands for _ in band.measured_at]
    return (sum(logs) / len(logs), -len(schedule.bands))
