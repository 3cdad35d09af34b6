"""`spectune heads train` / `spectune heads export`: draft heads trained on a pair's target, kept beside the pair."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Train draft heads (Medusa, Hydra, EAGLE, EAGLE-3, PPD's prompt tokens) for a target and export them to vLLM.",
                  no_args_is_help=True)


@app.command("train")
def train(
    pair: str = typer.Option(..., help="The pair: a folder holding target/, or a name (micro, tiny, smollm2)."),
    kind: list[str] = typer.Option(..., help="medusa, hydra, eagle, eagle3 or ppd (repeat for several; all: every kind)."),
    out: Path | None = typer.Option(None, help="Heads folder (default: <pair>/heads/<kind>)."),
    dtype: str = typer.Option("float32", help="The target's dtype for the feature pass: float32 or bfloat16."),
    windows: int = typer.Option(384, help="Training windows of the corpus in the feature pass."),
    heldout_windows: int = typer.Option(32, help="Held-out windows scored for the card's agreement."),
    seq_len: int = typer.Option(256, help="Tokens per window."),
    heads: int | None = typer.Option(None, help="Heads (medusa/hydra), unrolled training steps (eagle/eagle3) or prompt tokens (ppd)."),
    draft_vocab: int = typer.Option(0, help="Draft vocabulary: the corpus's N most frequent tokens (0: all)."),
    steps: int | None = typer.Option(None, help="Training steps (default per kind)."),
    batch: int | None = typer.Option(None, help="Windows per training step."),
    lr: float | None = typer.Option(None, help="Peak learning rate."),
    seed: int = typer.Option(0, help="Seed of the windows, the init and the batches."),
    force: bool = typer.Option(False, help="Retrain even when cached heads match."),
) -> None:
    """One teacher-forced feature pass of the target over the stdlib corpus (cached), then each kind from it."""
    from spectune.heads.build import options_for, train_heads
    from spectune.heads.features import FeatureSpec
    from spectune.heads.spec import KINDS, HeadsError
    from spectune.pair import load_pair
    from spectune.pair_ref import PairError, parse_pair

    kinds = list(KINDS) if kind == ["all"] else kind
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise typer.BadParameter(f"unknown kind {unknown[0]!r}; kinds: {', '.join(KINDS)} (or all)", param_hint="--kind")
    if out is not None and len(kinds) > 1:
        raise typer.BadParameter("--out names one heads folder: give one --kind with it", param_hint="--out")
    try:
        ref = parse_pair(pair).model_copy(update={"drafter": None, "dtype": dtype})
        loaded = load_pair(ref)
        features = FeatureSpec(seq_len=seq_len, train_windows=windows, heldout_windows=heldout_windows, seed=seed)
        for name in kinds:
            options = options_for(name, n_heads=heads, draft_vocab=draft_vocab, steps=steps, batch=batch, lr=lr, seed=seed)
            folder = train_heads(loaded.target, loaded.tokenizer, options, features, out, force=force)
            typer.echo(f"{name} heads ready: {folder}")
    except (PairError, HeadsError, ValueError) as err:
        raise typer.BadParameter(str(err)) from None


@app.command("export")
def export(
    heads: Path = typer.Argument(..., help="A heads folder (<pair>/heads/<kind>) of kind medusa, eagle or eagle3."),
    out: Path | None = typer.Option(None, help="Where to write (default: <pair>/heads/<kind>-vllm)."),
) -> None:
    """Write trained heads in the checkpoint format vLLM's speculative_config loads (train already does this)."""
    from spectune.heads.export import export_vllm
    from spectune.heads.load import load_heads
    from spectune.heads.spec import HeadsError, read_spec
    from spectune.pair import load_pair
    from spectune.pair_ref import PairError, parse_pair

    try:
        spec = read_spec(heads)
        loaded = load_pair(parse_pair({"target": spec.target.name}))
        found = load_heads(str(heads), spec.kind, loaded.target)
        folder = export_vllm(out or heads.parent / f"{spec.kind}-vllm", spec, found.module, found.vocab, loaded.target)
    except (PairError, HeadsError, ValueError) as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(f"vLLM {spec.kind} checkpoint: {folder}  (speculative_config: "
               f'{{"method": "{spec.kind}", "model": "{folder}"}})')
