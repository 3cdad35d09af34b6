"""The models of a pair and their training loop: config, seeded init, AdamW with
warm-up/cosine, early-exit loss, chunked gradient accumulation, bf16 autocast.

Precision: training runs on CPU. Where the CPU has AMX tiles (Sapphire Rapids and later)
presets with ``bf16_autocast`` train under ``torch.autocast("cpu", bfloat16)``, which is
about 3x faster there for the tiny target; elsewhere fp32. Weights are kept in fp32.
``SPECTUNE_BUILD_BF16=0`` / ``=1`` overrides.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

import torch

from .losses import exit_loss_weights, layer_losses, sample_windows, windows_per_chunk
from .presets import ModelSpec, Preset
from .seeding import derive_seed, seeded_deterministic
from .tokenizer import EOS_ID, PAD_ID


@dataclass(frozen=True)
class TrainedModel:
    """One trained model of a pair with what the card records about it."""

    spec: ModelSpec
    model: object  # a LlamaForCausalLM
    stats: dict  # from train_model
    heldout: list[float]  # held-out loss per exit layer (the drafter: the final layer only)


def make_config(spec: ModelSpec, vocab_size: int, max_position_embeddings: int = 1024):
    """A `LlamaConfig`, or for a spec with an `ssm` part the hybrid's `BambaConfig` (:func:`hybrid_config`)."""
    from transformers import LlamaConfig

    if spec.hidden_size % spec.n_heads:
        raise ValueError(f"hidden_size {spec.hidden_size} is not divisible by n_heads {spec.n_heads}")
    if spec.ssm is not None:
        return hybrid_config(spec, vocab_size, max_position_embeddings)
    return LlamaConfig(**_shared_config(spec, vocab_size, max_position_embeddings))


def _shared_config(spec: ModelSpec, vocab_size: int, max_position_embeddings: int) -> dict:
    """What every preset's config says alike, whatever its layers (Llama, or Bamba's hybrid)."""
    return dict(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_heads,
                max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, use_cache=True)


def hybrid_config(spec: ModelSpec, vocab_size: int, max_position_embeddings: int):
    """The hybrid target's `BambaConfig`: Llama-style blocks whose mixer is Mamba-2 or attention per layer.

    Why Bamba (transformers 5.25, CPU, no CUDA kernels), of the Mamba-2 hybrids transformers ships:
    its decoder block is Llama's with the mixer swapped per layer, so the engine's per-block hidden
    outputs, positions and 4-D tree masks mean what they mean for the Llama pairs (the attention
    layers take the mask; a 4-D mask gives the SSM layers none); the torch fallback of its mixer
    (chunked SSD scan, single-step state update, reference causal conv) runs here, and a forward
    continuing a cache matches a full forward to 6e-7 in fp32; its cache is transformers' own
    `DynamicCache`, whose SSM layers can record per-token states for rollback; and
    `AutoModelForCausalLM.from_pretrained` loads it. Jamba's mixer is Mamba-1; Zamba2 shares one
    attention block across depths (fed the embeddings again), FalconH1 runs attention and SSM side by
    side in every layer with muP multipliers, GraniteMoeHybrid and NemotronH add MoE or MLP-only
    layers: more than the experiment needs, with nothing the engine would use.
    """
    from transformers import BambaConfig

    ssm = spec.ssm
    assert ssm is not None
    if ssm.heads * ssm.head_dim != ssm.expand * spec.hidden_size:
        raise ValueError(f"SSM heads x head_dim ({ssm.heads} x {ssm.head_dim}) must equal expand x hidden_size "
                         f"({ssm.expand} x {spec.hidden_size})")
    if not all(0 <= layer < spec.n_layers for layer in ssm.attention_layers):
        raise ValueError(f"attention layers {ssm.attention_layers} must lie in 0..{spec.n_layers - 1}")
    return BambaConfig(
        **_shared_config(spec, vocab_size, max_position_embeddings),
        attn_layer_indices=list(ssm.attention_layers),
        mamba_n_heads=ssm.heads,
        mamba_d_head=ssm.head_dim,
        mamba_n_groups=1,
        mamba_d_state=ssm.state_size,
        mamba_d_conv=ssm.conv_kernel,
        mamba_expand=ssm.expand,
        mamba_chunk_size=ssm.chunk_size,
    )


def new_model(spec: ModelSpec, preset: Preset, seed: int, role: str):
    """A freshly initialised ``LlamaForCausalLM`` (``BambaForCausalLM`` for a hybrid spec), its init seeded
    from ``seed`` and ``role``."""
    from transformers import BambaForCausalLM, GenerationConfig, LlamaForCausalLM

    config = make_config(spec, preset.vocab_size, preset.max_position_embeddings)
    model_class = LlamaForCausalLM if spec.ssm is None else BambaForCausalLM
    with seeded_deterministic(derive_seed(seed, role + ":init")):
        model = model_class(config)
    model.generation_config = GenerationConfig(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


def bf16_supported() -> bool:
    """Whether bf16 autocast is fast here: ``SPECTUNE_BUILD_BF16`` if set, else AMX tiles."""
    env = os.environ.get("SPECTUNE_BUILD_BF16")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # private API; absent or failing: assume no fast bf16
        return False


def lr_factor(step: int, total: int, warmup: int, min_frac: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_frac``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model, spec: ModelSpec):
    """AdamW (no weight decay on norms and other 1-d parameters) and its lr schedule."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    warmup = max(1, round(spec.warmup_frac * spec.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, spec.steps, warmup, spec.min_lr_frac)
    )
    return opt, sched


def _train_step(model, opt, windows: torch.Tensor, chunk: int, weights: list[float], autocast,
                all_layers: bool, grad_clip: float) -> list[float]:
    """One optimizer step on ``windows``, gradients accumulated over chunks of ``chunk``
    windows (see ``LOGITS_CHUNK_BYTES``); returns the step's loss per exit layer."""
    opt.zero_grad(set_to_none=True)
    step_losses = [0.0] * len(weights)
    for part in windows.split(chunk):
        frac = part.shape[0] / windows.shape[0]
        with autocast:
            losses = layer_losses(model, part, all_layers=all_layers)
        loss = sum(w * l for w, l in zip(weights, losses)) * frac
        loss.backward()
        step_losses = [a + l.item() * frac for a, l in zip(step_losses, losses)]
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return step_losses


def _postfix(step_losses: list[float], sched) -> dict:
    """The progress bar's loss/lr read-out (and the first exit's loss for the target)."""
    postfix = {"loss": f"{step_losses[-1]:.3f}", "lr": f"{sched.get_last_lr()[0]:.1e}"}
    if len(step_losses) > 1:
        postfix["exit1"] = f"{step_losses[0]:.3f}"
    return postfix


def train_model(
    model,
    stream: torch.Tensor,
    spec: ModelSpec,
    seed: int,
    role: str,
    *,
    early_exit: bool,
    bf16: bool = False,
    progress: bool = True,
    desc: str = "",
) -> dict:
    """Train in place with AdamW + warm-up/cosine; returns training stats."""
    from tqdm.auto import tqdm

    opt, sched = _optimizer(model, spec)
    n_layers = model.config.num_hidden_layers
    weights = exit_loss_weights(n_layers) if early_exit else [1.0]
    chunk = windows_per_chunk(spec.seq_len, model.config.vocab_size)
    gen = torch.Generator().manual_seed(derive_seed(seed, role + ":batches"))
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    final_losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    with seeded_deterministic(derive_seed(seed, role + ":train")), tqdm(
        total=spec.steps, desc=desc or role, disable=not progress, dynamic_ncols=True, leave=True
    ) as bar:
        for step in range(spec.steps):
            windows = sample_windows(stream, spec.batch, spec.seq_len, gen)
            step_losses = _train_step(model, opt, windows, chunk, weights, autocast,
                                      early_exit and n_layers > 1, spec.grad_clip)
            sched.step()
            final_losses.append(step_losses[-1])
            bar.update(1)
            if step % 10 == 0 or step == spec.steps - 1:
                bar.set_postfix(_postfix(step_losses, sched))
    seconds = time.perf_counter() - t0
    model.eval()
    return _train_stats(final_losses, seconds, bf16, math.ceil(spec.batch / chunk), weights)


def _train_stats(final_losses: list[float], seconds: float, bf16: bool, chunks: int, weights: list[float]) -> dict:
    """The card's training entry; the final loss is the mean over the last tenth of steps."""
    tail = final_losses[-max(1, len(final_losses) // 10):]
    return {
        "train_seconds": round(seconds, 2),
        "train_loss_final": round(sum(tail) / len(tail), 4),
        "precision": "bf16-autocast" if bf16 else "fp32",
        "chunks_per_batch": chunks,
        "exit_loss_weights": [round(w, 6) for w in weights],
    }
