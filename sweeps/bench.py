"""How much a sweep costs beyond decoding: run a spec, then read the store's own timestamps.

    python -m spectune.sweeps.bench sweeps/specs/quick.yaml

Per-trial overhead = the trial's wall time as the driver saw it (Tune started it ->
its result was stored) minus the seconds the worker spent decoding for it. A worker's
first trial also starts Tune's trial process and decodes the prompt set once untimed
(every trial then times AR beside its configuration), so the median is over warm trials (each worker's second trial on). Prints a markdown block for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class SweepCost:
    spec: str
    trials: int
    failed: int
    sweep_wall_s: float  # connect + Ray start + workers loading the pair + every trial + shutdown
    tune_wall_s: float  # first trial started -> last trial stored
    decode_s: float  # inside decoding: every trial's AR and configuration passes, the first settling pass
    warm_overheads_s: list[float]

    def markdown(self, command: str) -> str:
        warm = sorted(self.warm_overheads_s)
        p90 = warm[min(len(warm) - 1, int(0.9 * len(warm)))] if warm else float("nan")
        median = statistics.median(warm) if warm else float("nan")
        return "\n".join([
            f"`{command}`",
            "",
            "| measure | value |",
            "|---|---|",
            f"| trials (failed) | {self.trials} ({self.failed}) |",
            f"| sweep wall time (store connect, Ray start, pair load, trials, shutdown) | {self.sweep_wall_s:.0f} s |",
            f"| first trial start -> last result stored | {self.tune_wall_s:.0f} s |",
            f"| inside decoding (every trial's AR + configuration) | {self.decode_s:.0f} s ({self.decode_s / self.tune_wall_s:.0%}) |",
            f"| per-trial overhead, warm worker: median / p90 / max | {median:.2f} / {p90:.2f} / {max(warm, default=float('nan')):.2f} s "
            f"(n={len(warm)}) |",
        ])


def warm_overheads(trials: pd.DataFrame) -> list[float]:
    """Wall minus decoding for every finished trial that was not its worker's first."""
    overheads = []
    for _, row in trials[trials.status == "done"].iterrows():
        extra: dict[str, Any] = row["extra"] or {}
        if extra.get("worker", {}).get("trials_run", 1) <= 1:
            continue
        wall = (row["finished_at"] - row["started_at"]).total_seconds()
        overheads.append(wall - float(extra["decode_s"]))
    return overheads


def measure(spec_path: Path, db: str | None, storage: str | None) -> SweepCost:
    from spectune.store import connect
    from spectune.sweeps.launcher import SweepOptions, run_sweep
    from spectune.sweeps.spec import load_spec

    spec = load_spec(spec_path)
    scratch = tempfile.mkdtemp(prefix="spectune-bench-")
    db = db or f"sqlite:///{scratch}/bench.db"
    started = time.perf_counter()
    with connect(db) as store:
        outcome = run_sweep(spec, store, SweepOptions(storage=storage or f"{scratch}/tune"))
        sweep_wall = time.perf_counter() - started
        trials = store.trials_frame(spec.name)
    decode = sum(float((e or {}).get("decode_s", 0.0)) for e in trials["extra"])
    tune_wall = (trials["finished_at"].max() - trials["started_at"].min()).total_seconds()
    return SweepCost(spec_path.name, outcome.trials, outcome.failed, sweep_wall, tune_wall, decode,
                     warm_overheads(trials))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--db", help="results store (default: a scratch SQLite file)")
    parser.add_argument("--storage", help="Tune's folder (default: a scratch folder)")
    args = parser.parse_args()
    cost = measure(args.spec, args.db, args.storage)
    print(cost.markdown(f"python -m spectune.sweeps.bench {args.spec}"))


if __name__ == "__main__":
    main()
