"""`spectune trees`: Sequoia's tools. Measure the acceptance vector, profile forward times, optimise a tree.

    spectune trees measure  --pair DIR --width 8 --out acceptance.json
    spectune trees profile  --pair DIR --max-tokens 64 --out profile.json
    spectune trees optimize --acceptance acceptance.json [--profile profile.json] --budget 32 --max-depth 8 --out tree.json
    spectune bench --pair DIR --method tree --set paths_file=tree.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from spectune.cli.output import fail

app = typer.Typer(help="Sequoia's tree optimiser: measure acceptance, profile the worker, optimise a tree.", no_args_is_help=True)

PairOption = typer.Option(..., "--pair", help="Pair folder holding target/ and drafter/ (from `models build`).")


def _say(message: str) -> None:
    Console(stderr=True).print(message, highlight=False, markup=False)


def _write(out: Path, data: dict[str, Any]) -> None:
    try:
        out.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as err:
        fail(f"cannot write {out}: {err.strerror}")


def _load(pair: Path, device: str, dtype: str):
    from spectune.pair import load_pair
    from spectune.pair_ref import parse_pair

    return load_pair(parse_pair({"dir": pair, "device": device, "dtype": dtype}))


@app.command("measure")
def measure(
    pair: Path = PairOption,
    prompts: str = typer.Option("default", help="JSONL prompt set; `default` is the shipped set."),
    limit: int | None = typer.Option(None, help="Use only the first N prompts."),
    width: int = typer.Option(8, help="Ranked drafter children per step: the length of p."),
    max_new_tokens: int = typer.Option(64, help="New tokens per prompt."),
    temperature: float = typer.Option(0.0, help="0 = greedy match; > 0 = recursive rejection sampling."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    out: Path = typer.Option(Path("acceptance.json"), help="Where to write the acceptance vector (JSON)."),
) -> None:
    """Estimate p_k, the probability that the k-th ranked drafter child is accepted, on a prompt set."""
    from spectune.bench import encode_prompts
    from spectune.engine.sampling import Sampling
    from spectune.prompts import load_prompts
    from spectune.sequoia_inputs import measure_acceptance

    if not 1 <= width <= 64:
        fail(f"--width must be in 1..64, got {width}")
    try:
        sampling = Sampling(temperature, top_p)
        prompt_set = load_prompts(prompts, limit)
        loaded = _load(pair, device, dtype)
        encoded = encode_prompts(loaded, prompt_set, max_new_tokens)
        recorder = measure_acceptance(loaded, encoded, width, max_new_tokens, sampling, seed)
    except ValueError as err:
        fail(str(err))
    data = {
        "acceptance": recorder.acceptance,
        "accepted_by_rank": recorder.accepted_by_rank,
        "steps": recorder.steps,
        "width": width,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "prompts": prompts,
        "n_prompts": len(prompt_set),
        "target": loaded.ref.target,
        "drafter": loaded.ref.drafter,
    }
    _write(out, data)
    shown = ", ".join(f"{p:.3f}" for p in recorder.acceptance)
    _say(f"p[k] over {recorder.steps} steps: [{shown}] (sum {sum(recorder.acceptance):.3f}) -> {out}")


@app.command("profile")
def profile(
    pair: Path = PairOption,
    max_tokens: int = typer.Option(64, help="Profile forwards of 1..N tree tokens."),
    past: int = typer.Option(128, help="Cached tokens before the tree (a fixed-length context)."),
    repeats: int = typer.Option(5, help="Timed forwards per size; the fastest is kept (contention only adds time)."),
    prompts: str = typer.Option("default", help="Text the past and tree tokens are taken from."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's own); use what the workers use."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    out: Path = typer.Option(Path("profile.json"), help="Where to write the forward times (JSON)."),
) -> None:
    """Time the target's (and drafter's) forward over 1..N tree tokens after a fixed past, on this worker."""
    import torch

    from spectune.profiling import profile_forwards
    from spectune.prompts import load_prompts
    from spectune.sequoia_inputs import check_profile_fits, filler_tokens

    if repeats < 1:
        fail(f"--repeats must be >= 1, got {repeats}")
    if threads is not None:
        if threads < 1:
            fail(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        loaded = _load(pair, device, dtype)
        check_profile_fits(loaded, past, max_tokens)
        filler = filler_tokens(loaded, load_prompts(prompts), past + max_tokens)
    except ValueError as err:
        fail(str(err))
    target_ms = profile_forwards(loaded.target, filler, past, max_tokens, repeats)
    drafter_ms = profile_forwards(loaded.drafter, filler, past, max_tokens, repeats) if loaded.drafter is not None else []
    data = {
        "past": past,
        "target_ms": target_ms,
        "drafter_ms": drafter_ms,
        "repeats": repeats,
        "device": device,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "target": loaded.ref.target,
        "drafter": loaded.ref.drafter,
    }
    _write(out, data)
    _say(f"target: {target_ms[0]:.2f} ms for 1 token, {target_ms[-1]:.2f} ms for {max_tokens} -> {out}")


@app.command("optimize")
def optimize(
    acceptance: Path = typer.Option(..., help="Acceptance vector JSON (from `trees measure`)."),
    profile_file: Path | None = typer.Option(None, "--profile", help="Forward times JSON (from `trees profile`): hardware-aware size and depth."),
    budget: int = typer.Option(..., help="Most draft nodes in the tree (root excluded)."),
    max_depth: int = typer.Option(..., help="Deepest draft position."),
    out: Path = typer.Option(Path("tree.json"), help="Where to write the path list (JSON) for `tree --set paths_file=...`."),
) -> None:
    """Run Sequoia's dynamic program and write the best tree as a Medusa path list."""
    from spectune.trees.sequoia import hardware_aware_tree, optimal_tree
    from spectune.trees.files import load_acceptance, load_profile

    if not 1 <= budget <= 512:
        fail(f"--budget must be in 1..512, got {budget}")
    if not 1 <= max_depth <= 64:
        fail(f"--max-depth must be in 1..64, got {max_depth}")
    try:
        p = load_acceptance(acceptance)
        if profile_file is None:
            tree = optimal_tree(p, budget, max_depth)
        else:
            tree = hardware_aware_tree(p, budget, max_depth, load_profile(profile_file))
    except ValueError as err:
        fail(str(err))
    data = {
        "paths": [list(path) for path in tree.paths],
        "expected_accepted": tree.expected_tokens - 1,
        "expected_tokens_per_step": tree.expected_tokens,
        "size": tree.size,
        "depth": tree.depth,
        "level_widths": list(tree.level_widths),
        "budget": budget,
        "max_depth": max_depth,
        "acceptance": list(p),
        "hardware_aware": profile_file is not None,
        "step_ms": tree.step_ms,
        "ms_per_token": tree.step_ms / tree.expected_tokens if tree.step_ms is not None else None,
    }
    _write(out, data)
    timing = f", {data['ms_per_token']:.2f} ms/token modelled" if tree.step_ms is not None else ""
    _say(f"tree of {tree.size} nodes, depth {tree.depth}: {tree.expected_tokens:.3f} expected tokens per step{timing} -> {out}")
