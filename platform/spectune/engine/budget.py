"""The one context-budget rule: what must fit in a model's positions while decoding.

During the last verification the target's cache holds the prompt and every new token but
the last, and the draft tree is appended after them, so

    prompt tokens + max_new_tokens + draft tree nodes <= context positions

Everything that admits work (the decode loop, the endpoint, bench, `MethodRegistry.build`) asks
this module, so the rule and its messages are written once.
"""

from __future__ import annotations

from typing import Any

CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length")


class ContextOverflow(ValueError):
    """Prompt, new tokens and draft tree do not fit the context; the numbers are kept for callers' messages."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, tree_nodes: int, context: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.tree_nodes = tree_nodes
        self.context = context
        needed = prompt_tokens + max_new_tokens + tree_nodes
        super().__init__(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) + draft tree "
            f"({tree_nodes} nodes) = {needed} exceeds the target's context of {context} positions"
        )

    @property
    def room(self) -> int:
        """The most new tokens this prompt and tree leave room for (< 1: none)."""
        return room_for_new_tokens(self.prompt_tokens, self.tree_nodes, self.context)


def context_length(config: Any) -> int:
    """A model's context in positions, read from its transformers config."""
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{type(config).__name__} names no context length (none of {', '.join(CONTEXT_FIELDS)})")


def pair_context(target_config: Any, drafter_config: Any | None) -> int:
    """A pair's context (transformers configs): both models hold the sequence and the tree, so the least of the two."""
    return min(context_length(config) for config in (target_config, drafter_config) if config is not None)


def room_for_new_tokens(prompt_tokens: int, tree_nodes: int, context: int) -> int:
    return context - prompt_tokens - tree_nodes


def check_fits(prompt_tokens: int, max_new_tokens: int, tree_nodes: int, context: int) -> None:
    """Raise ValueError for an empty prompt or no new tokens, ContextOverflow when they do not fit."""
    if prompt_tokens < 1:
        raise ValueError("the prompt is empty: it needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_tokens + max_new_tokens + tree_nodes > context:
        raise ContextOverflow(prompt_tokens, max_new_tokens, tree_nodes, context)


def max_tree_nodes(context: int) -> int:
    """The largest draft tree a context can verify: one prompt token and one new token must fit beside it."""
    return context - 2


def check_tree_fits(what: str, nodes: int, context: int) -> None:
    """A tree the context could never verify is a knob error: `what` names the knob (e.g. "budget=600")."""
    if nodes > max_tree_nodes(context):
        raise ValueError(
            f"{what} makes a draft tree of {nodes} nodes; the model context of {context} positions "
            f"allows 1..{max_tree_nodes(context)}"
        )
