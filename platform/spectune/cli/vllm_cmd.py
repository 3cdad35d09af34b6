"""`spectune vllm schedule`: a load sweep's per-load choices as vLLM's `num_speculative_tokens_per_batch_size`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import get_args

import typer

from spectune.cli.output import fail

app = typer.Typer(help="What spectune's vLLM sweeps give vLLM users to paste.", no_args_is_help=True)


@app.command("schedule")
def schedule(
    sweep: str = typer.Option(..., "--sweep", help="A vLLM load sweep (measured at two concurrencies at least)."),
    method: str | None = typer.Option(None, help="Schedule this vLLM method's family only (default: the fastest)."),
    max_num_seqs: int | None = typer.Option(None, min=1, help="Where the last band ends (default: the family's "
                                            "max_num_seqs knob, else vLLM's CPU default 128)."),
    min_speedup: float = typer.Option(1.0, min=0.0, help="A k is chosen at a load only where its speedup's 95% "
                                      "interval lies above this (1: surely faster than no speculation)."),
    out: Path | None = typer.Option(None, help="Also write the speculative config (JSON) to this file."),
    db: str | None = typer.Option(None, "--db", help="Database URL or SQLite path (default: $SPECTUNE_DB or "
                                  "~/.cache/spectune/spectune.db)."),
) -> None:
    """Per batch-size band, the fastest certified k of one method family (k = 0 where none pays surely),
    printed as the JSON `vllm serve --speculative-config` takes."""
    from rich.console import Console
    from rich.table import Table

    from spectune.backends.vllm_schedule import derive
    from spectune.cli.store_cmd import open_store

    store = open_store(db)
    if store.get_sweep(sweep) is None:
        fail(f"no sweep named {sweep!r} in {store.url} (see `spectune sweeps list`)")
    try:
        chosen = derive(store.trials_frame(sweep), sweep, method, max_num_seqs, min_speedup)
    except ValueError as err:  # ScheduleError, or an unknown method's registry error
        fail(str(err))
    table = Table(title=f"{sweep}: {chosen.method} {chosen.knobs or ''} by batch size", title_justify="left")
    for column in ("batch sizes", "k", "measured at", "speedup there"):
        table.add_column(column)
    for band in chosen.bands:
        table.add_row(f"{band.first}-{band.last}", str(band.k), ", ".join(f"c={c}" for c in band.measured_at),
                      "no speculation" if band.k == 0 else f"{band.speedup:.2f}x")
    Console(soft_wrap=True).print(table)
    typer.echo(chosen.to_json())
    if out is not None:
        out.write_text(chosen.to_json() + "\n")
        typer.echo(f"written to {out}")
    typer.echo(f"serve it: vllm serve MODEL --max-num-seqs {chosen.max_num_seqs} --speculative-config "
               f"{shlex.quote(chosen.to_json())}   (or: spectune serve --sweep {sweep} --schedule)")
    if any(band.k == 0 for band in chosen.bands):
        typer.echo("note: without async scheduling (vLLM's CPU platform), a k = 0 band still fetches draft tokens "
                   "after every step (3-7% of a step on 2 cores); spectune's servers skip it with its vLLM plugin: "
                   "`pip install workers/vllm/plugin` (in spectune's repository) into your vLLM environment")


@app.command("trace")
def trace(
    sweep: str = typer.Option(..., "--sweep", help="The vLLM load sweep whose schedule and fixed configurations race."),
    phases: str = typer.Option("1,4,16,4,1", help="The concurrency of each phase of the trace, in order."),
    rounds: int = typer.Option(2, min=1, help="Times every prompt is sent per phase (in full batches: 6 prompts at "
                                "concurrency 4, rounds 2: 16 requests)."),
    repeats: int = typer.Option(2, min=1, help="Times each contestant runs the whole trace (the contestants' "
                                "order reversed every other phase, or every other repeat when alone)."),
    method: str | None = typer.Option(None, help="The schedule's method family (default: the sweep's fastest)."),
    min_speedup: float = typer.Option(1.0, min=0.0, help="As for `spectune vllm schedule`."),
    max_num_seqs: int | None = typer.Option(None, min=1, help="As for `spectune vllm schedule`."),
    measure: str | None = typer.Option(None, help="frozen: every contestant's server up, the phases taken in turn, "
                                       "the others frozen; twins: the same, none frozen; alone: each contestant's "
                                       "whole trace on a fresh server, one alive at a time (default: the sweep's "
                                       "`vllm.measure`)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per contestant instead of tables."),
    db: str | None = typer.Option(None, "--db", help="Database URL or SQLite path (default: $SPECTUNE_DB or "
                                  "~/.cache/spectune/spectune.db)."),
) -> None:
    """The schedule against each fixed configuration of its family and no speculation, under a load that
    steps through PHASES: each on its own vLLM server, the same requests, measured as the sweep measured
    (frozen: all up, the phases taken in turn); per phase and over the trace, throughput, TPOT, p95 and
    the ratio to no speculation."""
    from spectune.backends.vllm import Measure
    from spectune.backends.vllm_schedule import derive, fixed_configurations
    from spectune.cli.store_cmd import open_store
    from spectune.sweeps.spec import parse_spec
    from spectune.workers.vllm.trace import TracePlan, parse_phases

    store = open_store(db)
    stored = store.get_sweep(sweep)
    if stored is None:
        fail(f"no sweep named {sweep!r} in {store.url} (see `spectune sweeps list`)")
    try:
        loads = parse_phases(phases)
        if measure is not None and measure not in get_args(Measure):
            raise ValueError(f"--measure {measure!r}: expected one of {', '.join(get_args(Measure))}")
        frame = store.trials_frame(sweep)
        chosen = derive(frame, sweep, method, max_num_seqs, min_speedup)
        fixed = fixed_configurations(frame, sweep, chosen)
        spec = parse_spec(stored.spec, "the sweep's stored spec")
        contestants, prompts, sampling = _trace_setup(spec, chosen, fixed)
    except ValueError as err:
        fail(str(err))
    plan = TracePlan(loads, sampling, rounds, repeats, measure or spec.vllm.measure)
    _run_trace(contestants, prompts, plan, json_out, spec)


def _trace_setup(spec, chosen, fixed):
    """The contestants' launches (schedule, each fixed k, no speculation), the encoded prompts, the sampling."""
    from transformers import AutoTokenizer

    from spectune.backends.vllm import NO_SPECULATION
    from spectune.backends.vllm_schedule import K
    from spectune.prompts import load_prompts, prompt_text
    from spectune.workers.vllm.load import Sampling
    from spectune.workers.vllm.trace import NO_SPECULATION as PLAIN
    from spectune.workers.vllm.trace import Contestant
    from spectune.workers.vllm.worker import EncodedPrompt, launch_for

    pair, threads, gpu = spec.pair.absolute(), max(1, round(spec.resources.cpus)), spec.resources.gpus > 0
    def launch(method: str, knobs: dict):
        return launch_for(pair, method, knobs, spec.vllm, threads, gpu)
    contestants = [Contestant("schedule", launch(chosen.method, chosen.served_knobs()))]
    contestants += [Contestant(f"{chosen.method} k={knobs[K]}", launch(chosen.method, knobs)) for knobs in fixed]
    contestants.append(Contestant(PLAIN, launch(NO_SPECULATION, dict(chosen.engine))))
    tokenizer = AutoTokenizer.from_pretrained(pair.target)
    prompts = [EncodedPrompt(p.id, p.category, tuple(tokenizer.encode(prompt_text(p, tokenizer), add_special_tokens=False)))
               for p in load_prompts(spec.prompts.set, spec.prompts.limit)]
    return contestants, prompts, Sampling(spec.max_new_tokens, 0.0, 1.0, spec.seed)


def _certificates(runs, prompts, spec) -> dict:
    """Each contestant's greedy outputs certified by spectune's engine against no speculation's first one."""
    from spectune.certificate import certify
    from spectune.engine.runner import CausalLM
    from spectune.pair import load_pair
    from spectune.workers.vllm.trace import NO_SPECULATION as PLAIN
    from spectune.workers.vllm.trace import outputs_of

    pair = spec.pair.absolute()
    if spec.vllm.dtype not in (None, "auto"):
        pair = pair.model_copy(update={"dtype": spec.vllm.dtype})
    target = CausalLM(load_pair(pair.model_copy(update={"drafter": None})).target)
    ids = [p.id for p in prompts]
    references = [outs[0] for outs in outputs_of(runs, PLAIN, ids)]
    labels = dict.fromkeys(run.label for run in runs)
    return {label: certify(target, [list(p.token_ids) for p in prompts], outputs_of(runs, label, ids), references)
            for label in labels}


def _run_trace(contestants, prompts, plan, json_out: bool, spec) -> None:
    import json

    from rich.progress import Progress

    from spectune.workers.vllm.server import ServerFailed
    from spectune.workers.vllm.load import RequestFailed
    from spectune.workers.vllm.trace import judge, run_trace, summarise

    with Progress(transient=True) as progress:
        loads = plan.phases
        task = progress.add_task(f"trace ({plan.measure})", total=len(contestants) * len(loads) * plan.repeats)
        def advance(label: str, repeat: int, phase: int) -> None:
            progress.update(task, advance=1, description=f"repeat {repeat + 1}: {label}, c={loads[phase]}")
        try:
            runs = run_trace(contestants, prompts, plan, on_phase=advance)
        except (ServerFailed, RequestFailed) as err:
            fail(f"the trace stopped: {err}")
    summaries = summarise(runs, loads)
    certificates = _certificates(runs, prompts, spec)
    verdict = judge(summaries, "schedule", [c.label for c in contestants[1:-1]])
    if json_out:
        for each in summaries:
            typer.echo(json.dumps({"label": each.label, "tokens_per_s": round(each.tokens_per_s, 2),
                                   "vs_no_speculation": [round(r, 3) for r in each.vs_no_speculation],
                                   "lossless_status": certificates[each.label].status.value,
                                   "exact_match_rate": round(certificates[each.label].exact_match_rate, 3),
                                   "phases": [{"concurrency": p.concurrency, "tokens_per_s": round(p.tokens_per_s, 2),
                                               "tpot_s": p.latency.tpot_s, "p95_latency_s": p.latency.p95_latency_s,
                                               "vs_no_speculation": [round(r, 3) for r in p.vs_no_speculation]}
                                              for p in each.phases]}))
    else:
        _trace_tables(summaries, loads, certificates)
    best = "no fixed configuration" if verdict.best_fixed is None else (
        f"{verdict.over_best_fixed:.2f}x the best fixed configuration ({verdict.best_fixed}) over the trace")
    slower = ", ".join(f"phase {i + 1} (c={loads[i]})" for i in verdict.slower_phases) or "no phase"
    typer.echo(f"schedule: {best}; slower than no speculation in every repeat at {slower}")


def _trace_tables(summaries, loads, certificates) -> None:
    import statistics

    from rich.console import Console
    from rich.table import Table

    def spread(ratios) -> str:
        return "-" if not ratios else f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    table = Table(title="tokens/s per phase (median of repeats); x no speculation (median, range of repeats)",
                  title_justify="left")
    table.add_column("contestant")
    for index, load in enumerate(loads):
        table.add_column(f"{index + 1}: c={load}", justify="right")
    table.add_column("whole trace", justify="right")
    table.add_column("greedy outputs", justify="right")
    for each in summaries:
        cells = [f"{p.tokens_per_s:.1f}  {spread(p.vs_no_speculation)}\nTPOT {1000 * (p.latency.tpot_s or 0):.0f} ms, "
                 f"p95 {p.latency.p95_latency_s or 0:.2f} s" for p in each.phases]
        table.add_row(each.label, *cells, f"{each.tokens_per_s:.1f}  {spread(each.vs_no_speculation)}",
                      f"{certificates[each.label].status.value}\n{certificates[each.label].exact_match_rate:.0%} exact")
    Console(width=max(Console().width, 160)).print(table)
