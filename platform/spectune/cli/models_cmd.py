"""`spectune models build`: train a deterministic target/drafter pair on the stdlib."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Build and inspect model pairs.", no_args_is_help=True)


@app.command("build")
def build(
    preset: str = typer.Option("micro", help="Pair size: micro (tests) or tiny (demo, benchmarks)."),
    out: Path | None = typer.Option(None, help="Output folder (default: the cache, ~/.cache/spectune/pairs)."),
    seed: int = typer.Option(0, help="Training seed; the same seed gives the same weights."),
    force: bool = typer.Option(False, help="Rebuild even if a cached pair exists."),
) -> None:
    """Train a target (early-exit loss on every layer) and a drafter sharing one BPE tokenizer."""
    from spectune.models.build import build_pair
    from spectune.models.presets import default_pair_dir

    try:
        path = build_pair(preset, out or default_pair_dir(preset, seed), seed=seed, force=force)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--preset") from None
    typer.echo(f"pair ready: {path}")


@app.command("import")
def import_(
    name: str | None = typer.Argument(None, help="A model a package ships: smollm2 (SmolLM2-135M-Instruct)."),
    gguf: Path | None = typer.Option(None, "--gguf", help="Any GGUF file transformers can load as a causal LM."),
    out: Path | None = typer.Option(None, help="Pair folder (default: ~/.cache/spectune/pairs/NAME)."),
    force: bool = typer.Option(False, help="Import again even if the folder holds this import."),
) -> None:
    """De-quantise a GGUF model into a cached pair folder (target/ with tokenizer and chat template, card.json)."""
    from spectune.cli.output import fail
    from spectune.models.imported import ImportFailed, import_model

    try:
        path = import_model(name, gguf, out, force=force)
    except ImportFailed as err:
        fail(str(err))
    typer.echo(f"pair ready: {path}")


@app.command("distill")
def distill(
    pair: str = typer.Option("smollm2", "--pair", help="A pair folder holding target/ (or an imported name: smollm2)."),
    seed: int = typer.Option(0, help="Training seed; the same seed gives the same drafter on this machine."),
    steps: int | None = typer.Option(None, min=1, help="Training steps (default: the spec's)."),
    force: bool = typer.Option(False, help="Distil again even if a cached drafter matches."),
    threads: int | None = typer.Option(None, min=1, help="Torch threads (default: torch's); 1 on a shared machine."),
) -> None:
    """Train a small drafter for the pair's target by distillation (its logits over code and its own answers)."""
    from spectune.cli.output import fail
    from spectune.models.distill import distill_drafter
    from spectune.models.imported import PACKAGED, imported_pair_dir

    folder = imported_pair_dir(pair) if pair in PACKAGED else Path(pair).expanduser()
    try:
        path = distill_drafter(folder, seed=seed, steps=steps, force=force, threads=threads)
    except ValueError as err:
        fail(str(err))
    typer.echo(f"pair ready: {path}")
