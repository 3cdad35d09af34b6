"""Pair presets: the architecture and training schedule of each model-pair size.

A preset is everything a build depends on besides the seed and the code, so the whole
preset goes into the pair's card and a cached pair built from another spec is rebuilt.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from spectune.paths import cache_dir


@dataclass(frozen=True)
class SsmSpec:
    """The Mamba-2 mixers of a hybrid target: which layers keep attention, and the SSM's geometry.

    A target with an `SsmSpec` is a transformers `BambaForCausalLM` (see :mod:`.training` for why
    Bamba): every layer not in `attention_layers` is a Mamba-2 mixer of `heads` x `head_dim`
    channels (= expand x hidden_size), a state of `state_size` per channel, a causal conv of
    `conv_kernel`, and the chunked scan's `chunk_size`.
    """

    attention_layers: tuple[int, ...]  # 0-based indices of the attention layers; the rest are SSM
    heads: int
    head_dim: int
    state_size: int
    conv_kernel: int = 4
    expand: int = 2
    chunk_size: int = 64


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and training schedule of one model of a pair (a Llama; a Bamba hybrid when `ssm` is set)."""

    n_layers: int
    hidden_size: int
    n_heads: int
    intermediate_size: int
    steps: int
    batch: int
    seq_len: int
    lr: float
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    ssm: SsmSpec | None = None  # None: every layer is attention (Llama)


@dataclass(frozen=True)
class Preset:
    name: str
    vocab_size: int
    max_train_bytes: int
    max_heldout_bytes: int
    target: ModelSpec
    drafter: ModelSpec
    eval_windows: int
    eval_seq_len: int
    bf16_autocast: bool = False
    max_position_embeddings: int = 1024
    description: str = ""


PRESETS: dict[str, Preset] = {
    # For tests: ~30 s end to end on 2 idle CPU cores. Vocab 512 (256 byte symbols + 254
    # merges + 2 specials, ~2.2 bytes/token on stdlib code): a tiny embedding/head, so
    # the 4-layer d=128 body dominates the target's cost and the drafter is ~7x cheaper.
    "micro": Preset(
        name="micro",
        vocab_size=512,
        max_train_bytes=1_000_000,
        max_heldout_bytes=150_000,
        target=ModelSpec(n_layers=4, hidden_size=128, n_heads=4, intermediate_size=352,
                         steps=350, batch=4, seq_len=256, lr=2e-3),
        drafter=ModelSpec(n_layers=1, hidden_size=64, n_heads=2, intermediate_size=176,
                          steps=350, batch=4, seq_len=256, lr=3e-3),
        eval_windows=32,
        eval_seq_len=256,
        bf16_autocast=False,
        description="test pair: 4-layer d=128 target, 1-layer d=64 drafter, vocab 512",
    ),
    # For the demo: ~9 minutes on 2 idle AMX-capable cores (bf16 autocast; estimated
    # from single-thread CPU time, see the card's timings), cached. Vocab 4096 (~3.6
    # bytes/token vs 3.2 for 2048): more text per target forward; with bf16 the larger
    # head costs only ~25% more per training step than 2048 would. In this budget both
    # models are far from converged and held-out loss follows tokens seen, not updates
    # (500 x 8 windows: 4.60; 800 x 4 windows: 4.75); the target gets ~0.9M tokens
    # (~1.65 CPU-s per step), the ~15x cheaper drafter 1.2M.
    "tiny": Preset(
        name="tiny",
        vocab_size=4096,
        max_train_bytes=12_000_000,  # more than the filtered stdlib has: use all of it
        max_heldout_bytes=1_000_000,
        target=ModelSpec(n_layers=6, hidden_size=384, n_heads=8, intermediate_size=1024,
                         steps=450, batch=8, seq_len=256, lr=1.5e-3),
        drafter=ModelSpec(n_layers=1, hidden_size=128, n_heads=4, intermediate_size=352,
                          steps=600, batch=8, seq_len=256, lr=3e-3),
        eval_windows=64,
        eval_seq_len=256,
        bf16_autocast=True,
        description="demo pair: 6-layer d=384 target, 1-layer d=128 drafter, vocab 4096",
    ),
    # The hybrid pairs: a Bamba target whose layers alternate Mamba-2 mixers and attention (SSM first), and a
    # plain Llama drafter on the same tokenizer. The target trains with plain next-token loss (no early
    # exits: nothing self-speculates on a hybrid). hybrid-micro is for tests (seconds); hybrid-tiny for the
    # STree benchmark (a few minutes on 2 cores).
    "hybrid-micro": Preset(
        name="hybrid-micro",
        vocab_size=512,
        max_train_bytes=400_000,
        max_heldout_bytes=60_000,
        target=ModelSpec(n_layers=4, hidden_size=64, n_heads=2, intermediate_size=176,
                         steps=240, batch=4, seq_len=128, lr=3e-3,
                         ssm=SsmSpec(attention_layers=(1, 3), heads=4, head_dim=32, state_size=16)),
        drafter=ModelSpec(n_layers=1, hidden_size=64, n_heads=2, intermediate_size=176,
                          steps=160, batch=4, seq_len=128, lr=3e-3),
        eval_windows=8,
        eval_seq_len=128,
        bf16_autocast=False,
        description="hybrid test pair: 4-layer d=64 Bamba target (SSM, attention, SSM, attention), 1-layer d=64 "
        "Llama drafter, vocab 512",
    ),
    "hybrid-tiny": Preset(
        name="hybrid-tiny",
        vocab_size=1024,
        max_train_bytes=3_000_000,
        max_heldout_bytes=300_000,
        target=ModelSpec(n_layers=6, hidden_size=128, n_heads=4, intermediate_size=352,
                         steps=300, batch=4, seq_len=256, lr=2e-3,
                         ssm=SsmSpec(attention_layers=(2, 5), heads=4, head_dim=64, state_size=16)),
        drafter=ModelSpec(n_layers=1, hidden_size=64, n_heads=2, intermediate_size=176,
                          steps=300, batch=4, seq_len=256, lr=3e-3),
        eval_windows=32,
        eval_seq_len=256,
        bf16_autocast=False,
        description="hybrid demo pair: 6-layer d=128 Bamba target (attention at layers 3 and 6, Mamba-2 elsewhere), "
        "1-layer d=64 Llama drafter, vocab 1024",
    ),
}


def preset_spec(preset: Preset) -> dict:
    """The preset as the card records it (JSON types): a model without an SSM part has no `ssm` key, so the
    cards of the all-attention pairs read as they did before hybrids existed (their builds stay cached)."""
    spec = json.loads(json.dumps(asdict(preset)))
    for role in ("target", "drafter"):
        if spec[role]["ssm"] is None:
            del spec[role]["ssm"]
    return spec


def get_preset(preset: str) -> Preset:
    try:
        return PRESETS[preset]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model-pair preset {preset!r}; allowed presets: {', '.join(sorted(PRESETS))}"
        ) from None


def default_pair_dir(preset: str, seed: int = 0) -> Path:
    """``$SPECTUNE_CACHE`` (else ``~/.cache/spectune``) ``/pairs/{preset}-seed{seed}``."""
    get_preset(preset)
    return cache_dir("pairs", f"{preset}-seed{int(seed)}")


def effective_spec(spec: ModelSpec, steps: int | None) -> ModelSpec:
    """``spec`` with its step count overridden (tests train a few steps), else as is."""
    return spec if steps is None else replace(spec, steps=int(steps))
