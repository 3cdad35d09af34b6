"""Self-speculation: the target drafts for itself through an early exit.

- `layerskip` (Elhoushi et al. 2024): draft a chain with the target's first l layers and its
  head, verify with all L layers.
- `del` (Zarch et al. 2025, "DEL: Context-Aware Dynamic Exit Layer"): every verification
  also yields *shadow tokens*, the head applied to each layer's hidden state at the accepted
  positions; their agreement with the target estimates each exit layer's acceptance a_l over
  a sliding window, and each round drafts with the (l, d) that maximises the expected tokens
  per layer computed, (1 + a_l + ... + a_l^d) / (d·l + L). With `cost: measured` (the default)
  the same rule divides by seconds instead of layers: a draft pass per exit layer and the
  verification, timed once per worker or replica, when it first builds the method (small models
  pay a fixed cost per forward pass that layer counting ignores).

Shadow tokens need the target's own layer outputs at the verified nodes: DEL names its exit
layers from `hidden_layers()` on shadow rounds and reads them in `observe` (`outcome.hidden`),
so nothing is hooked onto the target's shared blocks and two requests may decode at once on
one loaded target.

The drafts share the target's weights. Each exit layer keeps its own KV cache: the engine's
KVCache owns one model's cache and offers no view over another cache's first layers. Little is
lost on a chain: the draft's cache already holds every accepted draft token (computed while
drafting, with the same weights), so each round feeds the drafter at most two tokens (the
last draft token, when all were accepted, and the bonus).
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from transformers import PreTrainedModel

from spectune.engine.drafter import DraftContext, Drafter, StepOutcome
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling, probabilities
from spectune.trees.shapes import chain_shape
from spectune.trees.draft import DraftTree
from spectune.methods.base import Knobs, Models
from spectune.methods.early_exit import ExitHead, check_exit_layer, exit_view, n_layers
from spectune.methods.model_drafter import TemplateDrafter
from spectune.methods.registry import METHODS

# --- layerskip --------------------------------------------------------------------------------


class LayerSkipKnobs(Knobs):
    exit_layer: int | None = Field(
        None,
        ge=1,
        description="draft with the target's first l layers (1..L-1; default: a quarter of them, at least 1, "
        "as LayerSkip's exit 8 of Llama2-7B's 32)",
    )
    draft_len: int = Field(2, ge=1, le=64, description="tokens drafted per step")

    def tree_knobs(self) -> str:
        return f"draft_len={self.draft_len}"


def default_exit_layer(total_layers: int) -> int:
    return max(1, total_layers // 4)


class LayerSkipDrafter(TemplateDrafter):
    """A chain drafted by a shallow view of the target (its first l layers + norm + head)."""

    def __init__(self, target: CausalLM, exit_layer: int, draft_len: int) -> None:
        super().__init__(CausalLM(exit_view(target.model, exit_layer)), chain_shape(draft_len))
        self.exit_layer = exit_layer
        self._judged = 0  # draft tokens the target ruled on: those up to and including the first rejection
        self._accepted = 0

    def observe(self, outcome: StepOutcome) -> None:
        accepted = outcome.verdict.accepted
        self._accepted += accepted
        self._judged += accepted + (accepted < outcome.tree.size)  # tokens after a rejection were never judged

    def draft_modules(self) -> tuple[torch.nn.Module, ...]:
        """The exit view drafts (a module of its own over the target's blocks; the target's forward never calls it)."""
        return (self.lm.model,)

    def exit_layer_acceptance(self) -> dict[int, float]:
        """Per-token acceptance at the exit layer (comparable with DEL's shadow agreement), since build."""
        return {self.exit_layer: self._accepted / self._judged} if self._judged else {}


@METHODS.register(
    "layerskip",
    LayerSkipKnobs,
    needs_drafter=False,
    hybrid=(
        "it drafts with the target's own first layers, whose SSM states would run ahead of the committed "
        "prefix (the engine snapshots only the whole target's)"
    ),
    summary="self-speculation: a chain drafted by the target's own first l layers and its head (shared weights)",
    paper="Elhoushi et al. 2024, LayerSkip",
    cost="d passes of l target layers (+ head); d+1 tokens verified",
    rule="greedy match; rejection sampling min(1, p/q), residual norm(max(p-q, 0))",
    columns={"draft_len": ("draft_len",), "exit_layer": ("exit_layer",)},
)
def build_layerskip(knobs: LayerSkipKnobs, models: Models) -> LayerSkipDrafter:
    exit_layer = knobs.exit_layer or default_exit_layer(n_layers(models.target.model))
    check_exit_layer("exit_layer", exit_layer, models.target.model)
    return LayerSkipDrafter(models.target, exit_layer, knobs.draft_len)


# --- DEL's rule (pure) ------------------------------------------------------------------------


def expected_tokens(acceptance: float, draft_len: int) -> float:
    """Tokens a step emits when each draft token is accepted with probability a: 1 + a + ... + a^d.

    The closed form (1 - a^(d+1)) / (1 - a) divides by zero at a = 1; the sum does not.
    """
    return sum(acceptance**i for i in range(draft_len + 1))


@dataclass(frozen=True)
class RoundCosts:
    """What a round costs, in one unit: a draft pass through each exit layer, and the verification."""

    draft: Mapping[int, float]  # exit layer -> one draft pass
    verify_base: float  # the target's pass over the root alone
    verify_per_token: float  # and what each further tree token adds

    def round(self, exit_layer: int, draft_len: int) -> float:
        return draft_len * self.draft[exit_layer] + self.verify_base + self.verify_per_token * draft_len


def layer_costs(exit_layers: Iterable[int], total_layers: int) -> RoundCosts:
    """DEL's unit: decoder-layer passes, d·l + L (exact where layers dominate: large models, GPUs)."""
    return RoundCosts({layer: float(layer) for layer in exit_layers}, float(total_layers), 0.0)


def tokens_per_cost(acceptance: float, exit_layer: int, draft_len: int, costs: RoundCosts) -> float:
    """DEL's objective: expected tokens per unit of cost; with layer costs, (1-a^(d+1)) / (1-a) / (d·l + L)."""
    return expected_tokens(acceptance, draft_len) / costs.round(exit_layer, draft_len)


def del_choice(acceptance: Mapping[int, float], costs: RoundCosts, max_draft_len: int) -> tuple[int, int]:
    """The (exit layer, draft length) maximising tokens per cost; ties go to the shallower, shorter draft."""
    if not acceptance:
        raise ValueError("DEL needs an acceptance estimate for at least one exit layer")
    candidates = [(layer, d) for layer in sorted(acceptance) for d in range(1, max_draft_len + 1)]
    return max(candidates, key=lambda c: tokens_per_cost(acceptance[c[0]], c[0], c[1], costs))


def measured_costs(target: CausalLM, exit_layers: Iterable[int], max_draft_len: int) -> RoundCosts:
    """Seconds on this worker: best-of-N timings of one draft pass per exit layer and of verification.

    Per-pass overhead (embedding, head, framework) makes a shallow pass cost far more than l/L of
    a full one on small models and CPUs; counting layers alone then picks drafts that are too long.
    """
    draft = {layer: forward_seconds(exit_view(target.model, layer), 1) for layer in exit_layers}
    verify_one = forward_seconds(target.model, 1)
    verify_full = forward_seconds(target.model, max_draft_len + 1)
    return RoundCosts(draft, verify_one, max(verify_full - verify_one, 0.0) / max_draft_len)


_COSTS: weakref.WeakKeyDictionary[PreTrainedModel, dict[tuple[tuple[int, ...], int], RoundCosts]] = (
    weakref.WeakKeyDictionary())
_COSTS_LOCK = threading.Lock()


def worker_costs(target: CausalLM, exit_layers: Iterable[int], max_draft_len: int) -> RoundCosts:
    """`measured_costs` once per loaded target model: a sweep worker or a Serve replica times them
    when it first builds `del` with these exit layers and that length, and every later build reuses
    the timings (re-timing per request cost more than the decode on small models). The lock also
    keeps two threads building at once from timing beside each other."""
    key = (tuple(exit_layers), max_draft_len)
    with _COSTS_LOCK:
        known = _COSTS.setdefault(target.model, {})
        if key not in known:
            known[key] = measured_costs(target, key[0], max_draft_len)
        return known[key]


def forward_seconds(model: PreTrainedModel, n_tokens: int, context: int = 32, repeats: int = 5) -> float:
    """Fastest of `repeats` forwards of n_tokens after a `context`-token cache (noise only ever adds time)."""
    lm = CausalLM(model)
    vocab = model.config.vocab_size
    lm.forward([i % vocab for i in range(context)])
    tokens = [(context + i) % vocab for i in range(n_tokens)]
    best = math.inf
    for _ in range(repeats + 1):  # the first pass warms up
        _synchronize(lm.device)
        started = time.perf_counter()
        lm.forward(tokens)
        _synchronize(lm.device)
        best = min(best, time.perf_counter() - started)
        lm.cache.truncate(context)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ShadowWindow:
    """Per exit layer, the last `size` shadow agreements (1.0 = the layer's token is the target's)."""

    def __init__(self, exit_layers: Iterable[int], size: int) -> None:
        self._recent = {layer: deque(maxlen=size) for layer in exit_layers}
        self._total = {layer: 0.0 for layer in self._recent}
        self._count = {layer: 0 for layer in self._recent}

    def add(self, agreements: Mapping[int, Sequence[float]]) -> None:
        for layer, values in agreements.items():
            self._recent[layer].extend(values)
            self._total[layer] += sum(values)
            self._count[layer] += len(values)

    def estimate(self) -> dict[int, float]:
        """Acceptance per layer over the window, Laplace-smoothed so an empty window reads 0.5, not 0/0."""
        return {layer: (sum(recent) + 1.0) / (len(recent) + 2.0) for layer, recent in self._recent.items()}

    def overall(self) -> dict[int, float]:
        """Mean agreement per layer over everything ever added (for reports, not for choosing)."""
        return {layer: self._total[layer] / n for layer, n in self._count.items() if n}


def shadow_agreement(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: Mapping[int, torch.Tensor],
    target_logits: torch.Tensor,
    rows: Sequence[int],
    sampling: Sampling,
) -> dict[int, list[float]]:
    """How well each exit layer's shadow token agrees with the target at the given tree rows.

    hidden: {exit layer: [n+1, d]} layer outputs of the verification forward; target_logits:
    [n+1, V]. Greedy: 1.0 where the layer's argmax is the target's. Sampling: the chance a
    token drawn from the layer's distribution q is accepted against the target's p,
    sum_v min(p_v, q_v).
    """
    layers = sorted(hidden)
    index = torch.tensor(list(rows))
    shadow = head(torch.stack([hidden[layer][index] for layer in layers]))  # [m, k, V]
    target = target_logits[index]  # [k, V]
    if sampling.greedy:
        agree = (shadow.argmax(dim=-1) == target.argmax(dim=-1)).float()  # [m, k]
    else:
        agree = torch.minimum(probabilities(shadow, sampling), probabilities(target, sampling)).sum(dim=-1)  # [m, k]
    return {layer: agree[i].tolist() for i, layer in enumerate(layers)}


# --- del --------------------------------------------------------------------------------------


class DelKnobs(Knobs):
    window: int = Field(
        64, ge=1, le=100_000, description="shadow-token comparisons per exit layer that the acceptance estimate averages"
    )
    shadow_every: int = Field(
        4,
        ge=1,
        le=1000,
        description="compute shadow tokens on every n-th verification: each costs a head pass, about one layer's worth",
    )
    max_draft_len: int = Field(8, ge=1, le=64, description="longest chain a round may draft")
    min_exit_layer: int = Field(1, ge=1, description="shallowest exit layer considered")
    max_exit_layer: int | None = Field(None, ge=1, description="deepest exit layer considered (default: L-1)")
    cost: Literal["layers", "measured"] = Field(
        "measured",
        description="what a round costs: layers = DEL's d·l + L layer passes; measured = seconds of a draft pass "
        "per exit layer and of verification, timed once per worker (the first time it builds del)",
    )

    def tree_knobs(self) -> str:
        return f"max_draft_len={self.max_draft_len}"

    @model_validator(mode="after")
    def ordered(self) -> "DelKnobs":
        if self.max_exit_layer is not None and self.min_exit_layer > self.max_exit_layer:
            raise ValueError(f"min_exit_layer ({self.min_exit_layer}) must be <= max_exit_layer ({self.max_exit_layer})")
        return self


class DynamicExitDrafter(Drafter):
    """DEL: each round, draft a chain of d tokens through exit layer l, both picked from shadow tokens.

    The acceptance window describes the model pair, not one sequence, so `reset` keeps it: the
    next sequence starts from what the last one measured instead of from nothing.
    """

    def __init__(self, target: CausalLM, exit_layers: range, knobs: DelKnobs, costs: RoundCosts) -> None:
        self.target = target
        self.exit_layers = exit_layers
        self.costs = costs
        self.max_draft_len = knobs.max_draft_len
        self.max_tree_size = knobs.max_draft_len
        self.shadow_every = knobs.shadow_every
        self.window = ShadowWindow(exit_layers, knobs.window)
        self.chosen: Counter[tuple[int, int]] = Counter()  # (exit layer, draft length) -> rounds
        self._head = ExitHead(target.model)
        self._views: dict[int, PreTrainedModel] = {}  # exit layer -> its view of the target, built on first use
        self._drafters: dict[int, TemplateDrafter] = {}  # one cache-owning view per exit layer, built on first use
        self._sampling = Sampling()
        self._rounds = 0
        self._shadow_round = False  # this round's verification hands back the exit layers' outputs
        self.shadowed_rounds = 0  # verifications whose shadow tokens were computed
        self._choice: tuple[int, int] | None = None  # (exit layer, draft length); recomputed when the window moves

    def reset(self) -> None:
        self._shadow_round = False
        for drafter in self._drafters.values():
            drafter.reset()

    def draft(self, context: DraftContext) -> DraftTree:
        if self._choice is None:
            self._choice = del_choice(self.window.estimate(), self.costs, self.max_draft_len)
        layer, length = self._choice
        self.chosen[layer, length] += 1
        drafter = self._drafter(layer)
        drafter.use_shape(chain_shape(length))
        tree = drafter.draft(context)
        self._sampling = context.sampling
        self._shadow_round = self._rounds % self.shadow_every == 0
        self._rounds += 1
        return tree

    def hidden_layers(self) -> tuple[int, ...]:
        """On every `shadow_every`-th round, the exit layers: their outputs at the verified nodes give shadow tokens."""
        return tuple(self.exit_layers) if self._shadow_round else ()

    def commit(self, sequence: Sequence[int]) -> None:
        for drafter in self._drafters.values():
            drafter.commit(sequence)

    def observe(self, outcome: StepOutcome) -> None:
        self._shadow_round = False
        if not outcome.hidden:  # not a shadow round: nothing to learn
            return
        self.window.add(
            shadow_agreement(self._head, outcome.hidden, outcome.target_logits, outcome.verdict.path, self._sampling)
        )
        self.shadowed_rounds += 1
        self._choice = None

    def draft_modules(self) -> tuple[torch.nn.Module, ...]:
        """Every exit view a round may draft with (built here if not yet used; a view shares the target's
        weights and owns no cache, so an unused one costs nothing while decoding).

        Shadow tokens are not drafting: they are read from the verification forward (`outcome.hidden`)
        and the head applied after it, outside any module named here.
        """
        return tuple(self._view(layer) for layer in self.exit_layers)

    def exit_choices(self) -> dict[tuple[int, int], int]:
        """Rounds drafted with each (exit layer, draft length) since the drafter was built."""
        return dict(self.chosen)

    def exit_layer_acceptance(self) -> dict[int, float]:
        """Shadow-token agreement per exit layer over every verification since the drafter was built."""
        return self.window.overall()

    def _drafter(self, layer: int) -> TemplateDrafter:
        if layer not in self._drafters:
            self._drafters[layer] = TemplateDrafter(CausalLM(self._view(layer)), chain_shape(1))
        return self._drafters[layer]

    def _view(self, layer: int) -> PreTrainedModel:
        if layer not in self._views:
            self._views[layer] = exit_view(self.target.model, layer)
        return self._views[layer]


@METHODS.register(
    "del",
    DelKnobs,
    needs_drafter=False,
    hybrid=(
        "it drafts with the target's own first layers, whose SSM states would run ahead of the committed "
        "prefix (the engine snapshots only the whole target's)"
    ),
    summary="self-speculation choosing exit layer l and length d each round from shadow-token acceptance",
    paper="Zarch et al. 2025, DEL: context-aware dynamic exit layer",
    cost="d passes of l target layers (+ head), (l, d) chosen per round; d+1 tokens verified; "
    "head on each candidate layer at the accepted positions; the first build on a worker times one pass per "
    "candidate layer",
    rule="greedy match; rejection sampling min(1, p/q), residual norm(max(p-q, 0))",
)
def build_del(knobs: DelKnobs, models: Models) -> DynamicExitDrafter:
    target = models.target.model
    total = n_layers(target)
    high = knobs.max_exit_layer if knobs.max_exit_layer is not None else total - 1
    check_exit_layer("min_exit_layer", knobs.min_exit_layer, target)
    check_exit_layer("max_exit_layer", high, target)
    if knobs.min_exit_layer > high:
        raise ValueError(f"min_exit_layer ({knobs.min_exit_layer}) must be <= max_exit_layer ({high})")
    exit_layers = range(knobs.min_exit_layer, high + 1)
    if knobs.cost == "layers":
        costs = layer_costs(exit_layers, total)
    else:
        costs = worker_costs(models.target, exit_layers, knobs.max_draft_len)
    return DynamicExitDrafter(models.target, exit_layers, knobs, costs)
