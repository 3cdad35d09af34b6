"""What a method is: knobs, the models it may draft with, and a factory building its Drafter.

The Drafter protocol itself (`Drafter`, `DraftContext`, `StepOutcome`) belongs to the engine:
`spectune.engine.drafter`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from spectune.engine.drafter import Drafter
from spectune.engine.budget import pair_context
from spectune.engine.runner import CausalLM


class Knobs(BaseModel):
    """Base of every method's knobs: unknown fields are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def at_most_one_of(self, *names: str) -> None:
        """Knobs that are alternatives to each other (tree shapes, say): giving two is an error naming both."""
        given = [name for name in names if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(names)} (got {', '.join(given)})")

    def derived_columns(self) -> dict[str, int | str]:
        """Store knob columns (`spectune.config.KnobColumns` fields) computed from several knobs, for a column
        no single knob gives (falcon's draft_len = its tree's depth, block x passes at most); a column a given
        knob fills (`Method.columns`) takes precedence. Default: none."""
        return {}

    def tree_knobs(self) -> str:
        """`name=value` of the knobs that set the draft tree's size, for the build-time context check's
        message (`MethodRegistry.build`). Default: every knob given; methods with a tree knob name it."""
        given = [f"{name}={getattr(self, name)}" for name in type(self).model_fields if name in self.model_fields_set]
        return ", ".join(given) or "default knobs"


# why a trained-heads method is refused on a hybrid SSM-attention target (the registry's `hybrid`)
HEADS_ON_A_HYBRID = ("its trained heads draft from the target's layer outputs, which no heads trained on a hybrid "
                     "were checked on")

@dataclass(frozen=True)
class Models:
    """What a method may draft with."""

    target: CausalLM
    drafter: CausalLM | None

    @property
    def context(self) -> int:
        """Positions a draft tree must fit: the least of the target's and (if any) the drafter's context."""
        drafter = self.drafter.model.config if self.drafter is not None else None
        return pair_context(self.target.model.config, drafter)


@dataclass(frozen=True)
class Method:
    name: str
    knobs: type[Knobs]
    build: Callable[[Knobs, Models], Drafter]
    needs_drafter: bool
    lossless: bool
    summary: str  # one line: what it drafts with
    paper: str  # where the method comes from
    cost: str  # per step: drafter passes and tree tokens the target verifies
    rule: str  # how acceptance keeps it lossless (greedy / sampling)
    # store column (a spectune.config.KnobColumns field) -> the method's knobs that fill it, first non-None wins
    columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    needs_heads: str | None = None  # the kind of trained heads it drafts with (medusa, hydra, eagle, eagle3)
    hybrid: bool = False  # decodes a hybrid SSM-attention target (its drafts and commits are all the SSM states allow)
    hybrid_refusal: str = ""  # why not, when it does not (one clause, for the build-time error and `spectune methods`)

    def hybrid_support(self) -> str:
        """`spectune methods`' line on hybrid SSM-attention targets."""
        return "yes" if self.hybrid else f"no: {self.hybrid_refusal}"
