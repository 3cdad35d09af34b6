"""`spectune sweep SPEC.yaml` and `spectune demo`: run sweeps on Ray into the results store."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import typer
import yaml

from spectune.cli.output import fail

_DB_HELP = "Database URL or SQLite path (default: $SPECTUNE_DB or ~/.cache/spectune/spectune.db)."


def sweep(
    spec: Path = typer.Argument(..., help="Sweep spec (YAML), e.g. sweeps/specs/quick.yaml."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    address: str | None = typer.Option(None, "--address", help="Ray cluster: auto, ray://host:10001, host:6379 "
                                       "(default: $RAY_ADDRESS, else a local cluster)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted sweep of the same name."),
    storage: str | None = typer.Option(None, "--storage", help="Tune's results folder (default: "
                                       "~/.cache/spectune/ray_results; shared storage on multi-node clusters)."),
) -> None:
    """Run a sweep spec on Ray; every trial goes to the results store."""
    with _store(db) as store:  # first: an unreachable database fails in seconds, before Ray or torch load
        from spectune.sweeps.spec import SpecError, load_spec

        try:
            loaded = load_spec(spec)
        except SpecError as err:
            fail(str(err))
        outcome = _run(loaded, store, db, address, resume, storage)
    if outcome.status != "done":
        raise typer.Exit(130)


def _store(db: str | None) -> Any:
    from spectune.store import StoreUnavailable, connect

    try:
        return connect(db)
    except StoreUnavailable as err:
        fail(str(err))


def _run(spec: Any, store: Any, db: str | None, address: str | None, resume: bool, storage: str | None) -> Any:
    from rich.console import Console

    from spectune.backends import BACKENDS
    from spectune.store import resolve_url
    from spectune.sweeps.launcher import SweepFailed, SweepOptions, run_sweep

    console = Console()
    try:
        outcome = run_sweep(spec, store, SweepOptions(address=address, resume=resume, storage=storage), console)
    except SweepFailed as err:
        fail(str(err))
    failed = f", {outcome.failed} failed" if outcome.failed else ""
    console.print(f"sweep {outcome.name} {outcome.status}: {outcome.trials} trials{failed} in {outcome.wall_s:.0f} s "
                  f"({worker_summary(outcome.workers, BACKENDS.get(spec.backend).worker_counters)})",
                  highlight=False, soft_wrap=True)
    db_arg = f" --db {resolve_url(db)}" if db else ""
    console.print(f"results: spectune results {outcome.name}{db_arg}", highlight=False, soft_wrap=True)
    return outcome


def worker_summary(workers: list[dict], counters: Mapping[str, str]) -> str:
    """'1 worker(s), 1 pair load(s)': the worker count and the sums of the counters the sweep's backend
    declares (`Backend.worker_counters`; each backend's workers report their own)."""
    return ", ".join([f"{len(workers)} worker(s)",
                      *(f"{sum(w.get(key, 0) for w in workers)} {what}" for key, what in counters.items())])


def demo(
    pair: str = typer.Option("smollm2", "--pair", help="smollm2: the real SmolLM2-135M-Instruct (imported in seconds; "
                             "its distilled drafter joins when built); or a tiny pair's folder (built if missing, minutes)."),
    distill: bool = typer.Option(False, "--distill", help="smollm2: distil its drafter first (15-30 min on 2 cores, "
                                 "once), so the drafter methods (sps, tree) join the sweep."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
) -> None:
    """Sweep a small space on the real SmolLM2 model (or the tiny pair), print the Pareto front and what to open next."""
    if pair == "smollm2":
        outcome, note = _demo_smollm2(distill, db)
    else:
        outcome, note = _demo_tiny(Path(pair), db), None
    from spectune.cli.store_cmd import results
    from spectune.store import resolve_url

    url = resolve_url(db)
    results(sweep_arg=outcome.name, sweep_opt=None, json_out=False, db=db, objective=None)
    typer.echo(f"\ndashboard: spectune dashboard --db {url}")
    typer.echo(f"endpoint:  spectune serve --sweep {outcome.name} --objective speedup --db {url}")
    if note:
        typer.echo(f"\n{note}")


def _demo_smollm2(distill: bool, db: str | None) -> tuple[Any, str | None]:
    """Import SmolLM2 (cached), distil its drafter if asked, sweep smollm2_demo.yaml; without a drafter,
    only the methods that need none, and a note saying how to add the rest."""
    from spectune.methods import METHODS
    from spectune.models.imported import ImportFailed, import_model

    with _store(db) as store:  # fail fast, before the import
        try:
            folder = import_model("smollm2")
        except ImportFailed as err:
            fail(str(err))
        if distill:
            from spectune.models.distill import distill_drafter

            distill_drafter(folder)
        data = _shipped_spec("smollm2_demo.yaml")
        note = None
        if not (folder / "drafter" / "model.safetensors").is_file():
            skipped = [m for m in data["space"] if METHODS.get(m).needs_drafter]
            data["space"] = {m: k for m, k in data["space"].items() if m not in skipped}
            data["pair"] = {k: v for k, v in data["pair"].items() if k != "drafter"}
            note = (f"not swept: {', '.join(skipped)} (they draft with SmolLM2's distilled drafter, not built yet). "
                    "Add them: `spectune demo --distill` (or `spectune models distill --pair smollm2`, 15-30 min "
                    "once on 2 cores), then run the demo again.")
        data["space"], heads_note = _with_cached_heads(folder, data["space"])
        note = " ".join(n for n in (note, heads_note) if n) or None
        return _run_demo(store, data, db), note


# the heads methods the demo sweeps when their heads are trained, with their knobs: EAGLE-3's small trees, alone
# and fused with retrieval (4 heads nodes in 8, with heads trained on the target's own requests), were the
# fastest on SmolLM2 in bf16 here (docs/benchmarks.md); the others' defaults
DEMO_HEADS = {
    "rasd-eagle3": {"budget": [8], "draft_nodes": [4]},
    "eagle3": {"budget": [6], "max_depth": [5], "per_pass": [4]},
    "eagle": {}, "medusa": {}, "hydra": {}, "falcon": {},
}


def _with_cached_heads(folder: Path, space: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The demo's space plus every heads method whose heads are trained beside the pair; a note on how to
    train them when none are (they are the lever on a real model: see docs/heads.md)."""
    from spectune.methods import METHODS

    trained = {method: knobs for method, knobs in DEMO_HEADS.items() if method in METHODS.names()
               and (folder / "heads" / METHODS.get(method).needs_heads / "heads.safetensors").is_file()}
    if trained:
        return {**space, **{method: knobs for method, knobs in trained.items() if method not in space}}, None
    return space, ("not swept: the trained-heads methods (eagle3, eagle, medusa, ...): none are trained for "
                   "SmolLM2 yet. Train EAGLE-3 on its own chat answers with `spectune heads train --pair smollm2 "
                   "--kind eagle3 --text chat` (once, cached), then run the demo again.")


def _demo_tiny(pair: Path, db: str | None) -> Any:
    """Build the tiny pair if needed and sweep quick.yaml on it."""
    from spectune.models.build import build_pair
    from spectune.models.card import read_card

    folder = pair.expanduser().resolve()
    card = read_card(folder)
    if card is not None and card.get("preset") != "tiny":  # building would overwrite that pair
        fail(f"--pair {folder} holds a {card.get('preset')} pair; give a tiny pair's folder or a new one")
    with _store(db) as store:  # fail fast, before a minutes-long build
        build_pair("tiny", folder, progress=True)
        data = _shipped_spec("quick.yaml")
        kept = {k: v for k, v in data["pair"].items() if k not in ("dir", "target", "drafter")}  # device, dtype
        data["pair"] = {**kept, "dir": str(folder)}
        return _run_demo(store, data, db)


def _shipped_spec(name: str) -> dict[str, Any]:
    return yaml.safe_load(resources.files("spectune.sweeps").joinpath(f"specs/{name}").read_text())


def _run_demo(store: Any, data: dict[str, Any], db: str | None) -> Any:
    from spectune.sweeps.spec import SpecError, parse_spec

    try:
        spec = parse_spec(data, f"{data['name']}.yaml")
    except SpecError as err:
        fail(str(err))
    spec = spec.model_copy(update={"name": _free_name(spec, {s.name for s in store.list_sweeps()}, store.url)})
    return _run(spec, store, db, None, False, None)


def _free_name(spec: Any, taken: set[str], store_url: str) -> str:
    """quick, then quick-2, quick-3, ...: the demo can run again into the same store."""
    from ray.tune import Tuner

    from spectune.sweeps.launcher import SweepOptions, experiment_path

    name, n = spec.name, 1
    while name in taken or Tuner.can_restore(experiment_path(spec.model_copy(update={"name": name}), SweepOptions(),
                                                             store_url)):
        n += 1
        name = f"{spec.name}-{n}"
    return name
