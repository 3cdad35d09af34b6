"""`spectune vllm schedule`: a load sweep's per-load choices as vLLM's `num_speculative_tokens_per_batch_size`."""

from __future__ import annotations

import shlex
from pathlib import Path

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
