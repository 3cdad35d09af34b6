"""`spectune bench`: compare decoding configurations against AR on one pair and prompt set."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
import yaml

from spectune.cli.output import fail, results_markdown, results_table
from spectune.validation import cli_option, one_line


def bench(
    method: list[str] = typer.Option([], "--method", "-m", help="Method to run (repeatable): ar, sps, tree, pld, ..."),
    set_: list[str] = typer.Option([], "--set", help="Knob as key=value or method.key=value (YAML values: [4,2,1])."),
    config: Path | None = typer.Option(None, "--config", help="YAML file with `configs: [{method: ..., knob: ...}]`."),
    pair: Path | None = typer.Option(None, help="Pair folder holding target/ and drafter/ (from `models build`)."),
    target: str | None = typer.Option(None, help="Target model path or hub id (overrides --pair)."),
    drafter: str | None = typer.Option(None, help="Drafter model path or hub id (overrides --pair)."),
    prompts: str = typer.Option("default", help="JSONL prompt set; `default` is the shipped set."),
    limit: int | None = typer.Option(None, help="Use only the first N prompts."),
    max_new_tokens: int = typer.Option(128, help="New tokens per prompt."),
    temperature: float = typer.Option(0.0, help="0 = greedy (lossless checked token for token)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    seed: int = typer.Option(0),
    repeats: int = typer.Option(3, help="Timed passes; speedup is the median same-repeat ratio to AR."),
    warmup: int = typer.Option(2, help="Untimed warm-up prompts per configuration."),
    tolerance_ulps: float = typer.Option(2.0, help="Greedy certificate: how far below the argmax an emitted token "
                                         "may be, in units of the dtype's rounding of that logit (>= 0)."),
    peer: list[str] = typer.Option([], help="Also run a peer implementation: hf."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16."),
    threads: int | None = typer.Option(
        None, min=1, help="Torch threads (default: torch's). Use 1 on a shared or loaded CPU: spinning thread teams cost 10x."
    ),
    compile_: str = typer.Option("off", "--compile", help="off, default or max-autotune: torch.compile the target's "
                                 "forward, for every contender (the HF peers too). Each new input form compiles in "
                                 "the warm-up (default: about a minute each on 2 cores; max-autotune: several, for "
                                 "tuned matrix products over prepacked weights); the certificate then decides "
                                 "losslessness (rounding moves)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per configuration instead of a table."),
    markdown: bool = typer.Option(False, "--markdown", help="A Markdown table (as in docs/benchmarks.md) instead."),
    profile: bool = typer.Option(False, "--profile", help="Instead of speedups: where each one's decoding step goes "
                                 "(its phases under cProfile, the matrix products, ms per token) beside the "
                                 "machine's floor (one matrix-vector product over the model's weights)."),
) -> None:
    """Run configurations over a prompt set; report speedup over AR measured in the same run."""
    from spectune.bench import contender, run_bench
    from spectune.pair import load_pair
    from spectune.pair_ref import pair_from_options
    from spectune.prompts import load_prompts

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        settings = _settings(max_new_tokens, top_p, seed, repeats, warmup, tolerance_ulps)
        configs = [c.with_temperature(_temperature(temperature)) for c in _configs(method, set_, config)]
        ref = pair_from_options(pair, target, drafter, device, dtype, compile_)
        prompt_set = load_prompts(prompts, limit)
        if ref.compile != "off":
            sys.stderr.write(f"compiling the target's forward ({ref.compile}): the warm-up compiles each input form "
                             "once (minutes on 2 cores); the timed passes run compiled\n")
        loaded = load_pair(ref)
        contenders = [contender(loaded, c) for c in configs] + _peers(peer, loaded, temperature)
    except ValueError as err:
        fail(str(err))
    if profile:
        _profile(loaded, contenders, prompt_set, settings, "json" if json_out else "table")
        return
    progress = _Progress(len(prompt_set), settings.repeats, len(contenders) + 1)
    try:
        rows = run_bench(loaded, contenders, prompt_set, settings, on_prompt=progress.advance)
    except ValueError as err:
        fail(str(err))
    finally:
        progress.close()
    _print(rows, "json" if json_out else "markdown" if markdown else "table",
           f"{ref.target} + {ref.drafter or 'no drafter'}, {len(prompt_set)} prompts")


def _print(rows: list[Any], form: str, title: str) -> None:
    """The rows as JSON lines, a Markdown table (as in docs/benchmarks.md) or a terminal table."""
    if form == "json":
        for row in rows:
            sys.stdout.write(json.dumps(row.as_dict()) + "\n")
    elif form == "markdown":
        sys.stdout.write(results_markdown(rows))
    else:
        results_table(rows, title=title)


def _profile(loaded, contenders: list[Any], prompt_set: list[Any], settings: Any, form: str) -> None:
    """Each contender's step profile (AR first), then the floor and how far AR is from it."""
    from rich.console import Console
    from rich.table import Table

    from spectune.bench import ar_first, encode_prompts, warm_up
    from spectune.step_profile import matvec_floor_ms, profile_contender, read_floor_ms

    everyone = ar_first(loaded, contenders)
    encoded = encode_prompts(loaded, prompt_set, settings.max_new_tokens, max(c.tree_size for c in everyone))
    profiles = []
    for who in everyone:
        warm_up(who, encoded, settings)
        profiles.append(profile_contender(who, encoded, settings))
    floor, read = matvec_floor_ms(loaded.target), read_floor_ms(loaded.target)
    if form == "json":
        for each in profiles:
            sys.stdout.write(json.dumps({**each.as_dict(), "floor_ms": round(floor, 2),
                                         "wall_over_floor": round(each.wall_ms_per_token / floor, 3),
                                         "read_floor_ms": round(read, 2),
                                         "wall_over_read_floor": round(each.wall_ms_per_token / read, 3)}) + "\n")
        return
    phases = [name for name in profiles[0].phases_ms]
    table = Table(title=f"ms per step (profiled); floor {floor:.1f} ms per token (one matrix-vector product over "
                        f"the weights; a plain read of them {read:.1f} ms), {loaded.ref.dtype}, "
                        f"{__import__('torch').get_num_threads()} thread(s)")
    for column in ["configuration", "ms/tok", "x floor", "x read", "tok/step", "step", *phases, "matmul", "other"]:
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for each in profiles:
        ours = bool(each.phases_ms)  # a peer's own loop has no phases of ours, nor steps we can count
        cells = [f"{each.phases_ms[p]:.2f}" if ours else "-" for p in phases]
        table.add_row(each.label, f"{each.wall_ms_per_token:.1f}", f"{each.wall_ms_per_token / floor:.2f}",
                      f"{each.wall_ms_per_token / read:.2f}", f"{each.tokens_per_step:.2f}" if ours else "-",
                      f"{each.profiled_ms_per_step:.1f}", *cells,
                      f"{each.matmul_ms:.1f}", f"{each.other_ms:.2f}" if ours else "-")
    Console(width=max(Console().width, 150)).print(table)
    sys.stdout.write("a peer's step and matmul columns are per token; phases are per step of our loop, profiled\n")


def _temperature(value: float) -> float:
    """Every configuration decodes at --temperature (its one home is the configuration)."""
    from spectune.config import check_temperature

    try:
        return check_temperature(value)
    except ValueError as err:
        raise ValueError(f"--temperature: {err}") from None


def _settings(max_new_tokens: int, top_p: float, seed: int, repeats: int, warmup: int, tolerance_ulps: float = 2.0):
    from pydantic import ValidationError

    from spectune.config import Settings

    try:
        return Settings(max_new_tokens=max_new_tokens, top_p=top_p, seed=seed, repeats=repeats, warmup=warmup,
                        tolerance_ulps=tolerance_ulps)
    except ValidationError as err:
        raise ValueError(one_line(err, label=cli_option)) from None


def _configs(methods: list[str], sets: list[str], config_file: Path | None):
    from spectune.bench import load_config_file
    from spectune.methods import METHODS

    configs = load_config_file(str(config_file)) if config_file else []
    if not methods and not configs:
        methods = ["sps"]
    per_method: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in sets:
        key, value = _parse_set(item)
        owner, _, knob = key.rpartition(".")
        owners = [owner] if owner else [m for m in methods if knob in METHODS.get(m).knobs.model_fields]
        if not owners or any(o not in per_method for o in owners):
            raise ValueError(f"--set {item}: no --method given takes the knob {knob!r}")
        for name in owners:
            per_method[name][knob] = value
    return configs + [METHODS.config(m, knobs) for m, knobs in per_method.items()]


def _parse_set(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {item!r}: expected key=value, e.g. draft_len=4")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ValueError(f"--set {item!r}: the value is not valid YAML") from None


def _peers(names: list[str], loaded, temperature: float) -> list:
    from spectune.peer_hf import hf_peers

    unknown = set(names) - {"hf"}
    if unknown:
        raise ValueError(f"--peer: unknown peer(s) {sorted(unknown)}; known: hf")
    return hf_peers(loaded, temperature) if names else []


class _Progress:
    """A rich progress bar over (repeat, prompt) rounds, each decoded by AR and every configuration, on stderr."""

    def __init__(self, prompts: int, repeats: int, contenders: int) -> None:
        from rich.console import Console
        from rich.progress import Progress

        self._prompts = prompts
        self._bar = Progress(console=Console(stderr=True), transient=True)
        self._task = self._bar.add_task(f"prompts x {contenders} configurations", total=prompts * repeats)
        self._bar.start()

    def advance(self, repeat: int, prompt: int) -> None:
        self._bar.update(self._task, advance=1, description=f"repeat {repeat + 1}, prompt {prompt + 1}/{self._prompts}")

    def close(self) -> None:
        self._bar.stop()
