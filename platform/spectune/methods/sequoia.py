"""`sequoia`: the DP-optimal static tree for a node budget, drafted level by level by the drafter.

The tree is Sequoia's dynamic program over a measured acceptance vector
(`spectune trees measure`); with a forward-time profile (`spectune trees profile`) it is the
hardware-aware choice of size and depth. Sweeps turn `budget` and `max_depth`.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from spectune.trees.sequoia import PRIOR_ACCEPTANCE, SequoiaTree, check_acceptance, hardware_aware_tree, optimal_tree
from spectune.trees.shapes import paths_shape
from spectune.methods.base import Knobs, Models
from spectune.methods.model_drafter import TemplateDrafter
from spectune.methods.registry import METHODS
from spectune.trees.files import load_acceptance, load_profile


class SequoiaKnobs(Knobs):
    budget: int = Field(16, ge=1, le=512, description="draft nodes per step (root excluded); the tree uses at most this")
    max_depth: int = Field(6, ge=1, le=64, description="deepest draft position")
    acceptance: list[float] | None = Field(
        None, description=f"p[k] per child rank, inline (default: the prior {list(PRIOR_ACCEPTANCE)})"
    )
    acceptance_file: str | None = Field(None, description="JSON from `spectune trees measure` holding p[k]")
    profile_file: str | None = Field(
        None, description="JSON from `spectune trees profile`: pick size and depth by modelled time per token"
    )

    @field_validator("acceptance")
    @classmethod
    def probabilities(cls, value: list[float] | None) -> list[float] | None:
        return None if value is None else list(check_acceptance(value))

    @model_validator(mode="after")
    def files_readable(self) -> "SequoiaKnobs":
        if self.acceptance is not None and self.acceptance_file is not None:
            raise ValueError("give acceptance or acceptance_file, not both")
        self.acceptance_vector()  # a file that does not parse fails here, not mid-sweep
        if self.profile_file is not None:
            load_profile(self.profile_file)
        return self

    def tree_knobs(self) -> str:
        return f"budget={self.budget}"

    def acceptance_vector(self) -> tuple[float, ...]:
        if self.acceptance is not None:
            return tuple(self.acceptance)
        if self.acceptance_file is not None:
            return load_acceptance(self.acceptance_file)
        return PRIOR_ACCEPTANCE

    def tree(self) -> SequoiaTree:
        acceptance = self.acceptance_vector()
        if self.profile_file is None:
            return optimal_tree(acceptance, self.budget, self.max_depth)
        return hardware_aware_tree(acceptance, self.budget, self.max_depth, load_profile(self.profile_file))


@METHODS.register(
    "sequoia",
    SequoiaKnobs,
    needs_drafter=True,
    hybrid=True,
    summary="Sequoia's DP-optimal static tree for a node budget (optionally hardware-aware), drafted by top-k",
    paper="Chen et al. 2024, Sequoia (scalable, robust, hardware-aware speculative decoding)",
    cost="tree depth drafter passes (one per level); at most budget + 1 tokens verified",
    rule="greedy: top-k siblings, match; sampling: Gumbel-top-k siblings, recursive rejection (SpecTree)",
    columns={"node_budget": ("budget",)},
)
def build_sequoia(knobs: SequoiaKnobs, models: Models) -> TemplateDrafter:
    return TemplateDrafter(models.drafter, paths_shape(knobs.tree().paths))
