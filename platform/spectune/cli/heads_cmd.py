"""`spectune heads train` / `spectune heads export`: draft heads trained on a pair's target, kept beside the pair."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Train draft heads (Medusa, Hydra, EAGLE, EAGLE-3, Falcon, PPD's prompt tokens, Hidden Transfer's "
                  "transfer maps) for a target and export them to vLLM.",
                  no_args_is_help=True)


@app.command("train")
def train(
    pair: str = typer.Option(..., help="The pair: a folder holding target/, or a name (micro, tiny, smollm2)."),
    kind: list[str] = typer.Option(..., help="medusa, hydra, eagle, eagle3, falcon, ppd or transfer (repeat for several; all: every kind)."),
    out: Path | None = typer.Option(None, help="Heads folder (default: <pair>/heads/<kind>)."),
    dtype: str = typer.Option("float32", help="The target's dtype for the feature pass: float32 or bfloat16."),
    windows: int = typer.Option(384, help="Training windows of the corpus in the feature pass."),
    heldout_windows: int = typer.Option(32, help="Held-out windows scored for the card's agreement."),
    seq_len: int = typer.Option(256, help="Tokens per window."),
    heads: int | None = typer.Option(None, help="Heads (medusa/hydra), unrolled training steps (eagle/eagle3), the block (falcon), prompt tokens (ppd) or pseudo positions (transfer)."),
    layer: int | None = typer.Option(None, help="transfer: the target block after which the pseudo states enter (1..L-1; default L//2)."),
    draft_vocab: int = typer.Option(0, help="Draft vocabulary: the corpus's N most frequent tokens (0: all)."),
    steps: int | None = typer.Option(None, help="Training steps (default per kind)."),
    batch: int | None = typer.Option(None, help="Windows per training step."),
    lr: float | None = typer.Option(None, help="Peak learning rate."),
    seed: int = typer.Option(0, help="Seed of the windows, the init and the batches."),
    text: str = typer.Option("stdlib", help="What the feature pass reads: stdlib (the standard library's code), "
                             "chat (the target's own answers to chat requests, generated once and cached: what "
                             "the heads will be asked), or mixed (both; judged on chat)."),
    answers: int = typer.Option(256, min=1, help="With chat/mixed: training requests the target answers."),
    answer_tokens: int = typer.Option(160, min=8, help="With chat/mixed: the longest answer, in tokens."),
    written: float = typer.Option(0.5, min=0.0, max=1.0, help="With chat/mixed: the share of requests the target "
                                  "writes itself from each category's openers (Magpie); the rest are made from "
                                  "the stdlib's functions and seeded arithmetic."),
    force: bool = typer.Option(False, help="Retrain even when cached heads match."),
) -> None:
    """One teacher-forced feature pass of the target over a text (cached), then each kind from it."""
    from spectune.heads.build import options_for_each, train_heads
    from spectune.heads.chat_text import ChatText
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
        if text not in ("stdlib", "chat", "mixed"):
            raise ValueError(f"--text must be stdlib, chat or mixed, not {text!r}")
        features = FeatureSpec(seq_len=seq_len, train_windows=windows, heldout_windows=heldout_windows, seed=seed,
                               text=text, chat=ChatText(answers=answers, answer_tokens=answer_tokens, written=written))
        every = options_for_each(kinds, n_heads=heads, draft_vocab=draft_vocab, steps=steps, batch=batch, lr=lr,
                                 seed=seed, layer=layer)
        for options in every:
            folder = train_heads(loaded.target, loaded.tokenizer, options, features, out, force=force)
            typer.echo(f"{options.kind} heads ready: {folder}")
    except (PairError, HeadsError, ValueError) as err:
        raise typer.BadParameter(str(err)) from None


@app.command("export")
def export(
    heads: Path = typer.Argument(..., help="A heads folder (<pair>/heads/<kind>) of kind medusa, eagle or eagle3."),
    out: Path | None = typer.Option(None, help="Where to write (default: <pair>/heads/<kind>-vllm, or "
                                    "<kind>-speculators with --format speculators)."),
    format: str = typer.Option("vllm", "--format", help="vllm: the folder vLLM's speculative_config loads as its "
                               "draft; speculators: the `speculators` checkpoint (EAGLE-3), which `vllm serve FOLDER` "
                               "loads with its target"),
    tokens: int | None = typer.Option(None, "--tokens", min=1, help="With speculators: the draft length it "
                                      "proposes (default: the positions the heads were trained for)."),
) -> None:
    """Write trained heads in a format vLLM loads (train already writes the vllm one)."""
    from spectune.heads.export import export_speculators, export_vllm
    from spectune.heads.load import load_heads
    from spectune.heads.spec import HeadsError, read_spec
    from spectune.pair import load_pair
    from spectune.pair_ref import PairError, parse_pair

    try:
        spec = read_spec(heads)
        loaded = load_pair(parse_pair({"target": spec.target.name}))
        found = load_heads(str(heads), spec.kind, loaded.target)
        if format == "speculators":
            folder = export_speculators(out or heads.parent / f"{spec.kind}-speculators", spec, found.module,
                                        found.vocab, loaded.target, tokens)
        elif format == "vllm":
            folder = export_vllm(out or heads.parent / f"{spec.kind}-vllm", spec, found.module, found.vocab, loaded.target)
        else:
            raise typer.BadParameter(f"unknown format {format!r}; formats: vllm, speculators", param_hint="--format")
    except (PairError, HeadsError, ValueError) as err:
        raise typer.BadParameter(str(err)) from None
    if format == "speculators":
        typer.echo(f"speculators {spec.kind} checkpoint: {folder}  (serve it: vllm serve {folder})")
        return
    typer.echo(f"vLLM {spec.kind} checkpoint: {folder}  (speculative_config: "
               f'{{"method": "{spec.kind}", "model": "{folder}"}})')
