"""``spectune models build``: train a small target/drafter pair from scratch, offline.

No machine here can download weights, so the project builds its own pairs on a corpus
every machine has (the Python standard library's source, see :mod:`.corpus`):

1. a byte-level BPE tokenizer (``tokenizers``), shared by both models;
2. a *target* ``LlamaForCausalLM`` trained with an early-exit loss on every layer
   (LayerSkip-style), so that exiting after layer ``l`` through the final norm and the
   shared ``lm_head`` gives usable logits (self-speculation, DEL exit layers);
3. a 1-layer *drafter* ``LlamaForCausalLM`` with plain next-token loss;
4. a held-out evaluation (loss per target exit layer and for the drafter);
5. everything saved with ``save_pretrained`` (safetensors) so that the ordinary
   ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``
   path loads it, exactly as it would load a Hub checkpoint on a GPU cluster.

Layout of a pair directory::

    out/target/   config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json
    out/drafter/  (same files)
    out/card.json (preset, seed, sizes, timings, held-out losses, corpus description)

Determinism: a build with the same preset, seed and step count on the same machine
and torch thread count gives byte-identical weights (seeded init, a seeded
``torch.Generator`` for the batches, ``torch.use_deterministic_algorithms(True)``,
a deterministic tokenizer). The global torch RNG and the deterministic-algorithms flag
are restored afterwards. Different machines (CPU kernels, thread counts, bf16 support)
may give slightly different weights.

Precision: training runs on CPU. Where the CPU has AMX tiles (Sapphire Rapids and later)
presets with ``bf16_autocast`` train under ``torch.autocast("cpu", bfloat16)``, which is
about 3x faster there for the tiny target; elsewhere fp32. Weights are kept and saved
in fp32 and the evaluation runs in fp32. ``SPECTUNE_BUILD_BF16=0`` / ``=1`` overrides.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from spectune.paths import cache_dir

from .corpus import Corpus, load_corpus

#: Bumped whenever a change to this module changes what a build produces; cached pairs
#: whose card has another version are rebuilt.
BUILDER_VERSION = 2

EOS_TOKEN = "<|endoftext|>"  # also the bos token (GPT-2 convention); id 0
PAD_TOKEN = "<|pad|>"  # never in the training data; id 1
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
EOS_ID, PAD_ID = 0, 1

#: The held-out windows are drawn with this fixed seed, independent of the build seed,
#: so that pairs built with different seeds are scored on the same text.
EVAL_SEED = 1234


# ---------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and training schedule of one model of a pair."""

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
}


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


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` (ids 0/1 = ``<|endoftext|>``/``<|pad|>``).

    Byte-level: every string, any Unicode included, encodes and decodes back exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID and tok.token_to_id(PAD_TOKEN) == PAD_ID
    return tok


def wrap_tokenizer(tok, model_max_length: int = 1024):
    """The ``transformers`` fast tokenizer saved with the models."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="left",  # decoder-only generation pads on the left
        clean_up_tokenization_spaces=False,  # keep decode(encode(s)) == s
    )


def encode_stream(tok, texts: Sequence[str]) -> torch.Tensor:
    """One token stream: each document preceded by ``<|endoftext|>``, plus a final one."""
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids.append(EOS_ID)
        ids.extend(enc.ids)
    ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------
# Models, losses
# ---------------------------------------------------------------------------------------


def make_config(spec: ModelSpec, vocab_size: int, max_position_embeddings: int = 1024):
    from transformers import LlamaConfig

    if spec.hidden_size % spec.n_heads:
        raise ValueError(f"hidden_size {spec.hidden_size} is not divisible by n_heads {spec.n_heads}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        use_cache=True,
    )


def exit_loss_weights(n_layers: int) -> list[float]:
    """Weights of the per-layer losses in the target's training loss.

    ``w_l ∝ l`` for the intermediate exits ``l = 1..L-1`` (deeper exits matter more:
    they are the ones self-speculation uses), and the final layer gets as much as all
    intermediate exits together (``w_L ∝ sum_{l<L} l``), i.e. half the total, because the
    final layer's quality is the target's quality. Normalised to sum to 1. For L=6:
    1,2,3,4,5,15 / 30; for L=4: 1,2,3,6 / 12; for L=1: [1.0].
    """
    if n_layers < 1:
        raise ValueError("n_layers must be >= 1")
    if n_layers == 1:
        return [1.0]
    raw = [float(l) for l in range(1, n_layers)]
    raw.append(sum(raw))
    total = sum(raw)
    return [r / total for r in raw]


def exit_logits(model, hidden_states: Sequence[torch.Tensor], layer: int) -> torch.Tensor:
    """Logits when exiting after decoder layer ``layer`` (1-based) of a Llama-style model.

    ``hidden_states`` is ``outputs.hidden_states`` from a forward with
    ``output_hidden_states=True``: index 0 is the embeddings, index ``l`` the output of
    layer ``l``. In transformers the *last* entry is already passed through the final
    norm (it is ``last_hidden_state``); the intermediate ones are not, so those get
    ``model.model.norm`` here. Both then go through the shared ``lm_head``.
    """
    n_layers = len(hidden_states) - 1
    if not 1 <= layer <= n_layers:
        raise ValueError(f"exit layer must be in 1..{n_layers}, got {layer}")
    h = hidden_states[layer]
    if layer < n_layers:
        h = model.model.norm(h)
    return model.lm_head(h)


def layer_losses(model, windows: torch.Tensor, all_layers: bool = True) -> list[torch.Tensor]:
    """Mean next-token cross-entropy per exit layer on ``windows`` ``[B, T+1]``.

    Inputs are ``windows[:, :-1]``, targets ``windows[:, 1:]``. With ``all_layers`` the
    list has one loss per decoder layer (index i = exit after layer i+1); otherwise only
    the final layer's loss. The final entry equals the model's own ``outputs.loss`` for
    ``model(input_ids=windows, labels=windows)``.
    """
    inputs, targets = windows[:, :-1], windows[:, 1:].reshape(-1)
    vocab = model.config.vocab_size
    if not all_layers:
        out = model.model(input_ids=inputs, use_cache=False)
        logits = model.lm_head(out.last_hidden_state)
        return [F.cross_entropy(logits.reshape(-1, vocab).float(), targets)]
    out = model.model(input_ids=inputs, use_cache=False, output_hidden_states=True)
    hs = out.hidden_states
    n_layers = model.config.num_hidden_layers
    if len(hs) != n_layers + 1:
        raise RuntimeError(f"expected {n_layers + 1} hidden states, got {len(hs)}")
    losses = []
    for layer in range(1, n_layers + 1):
        logits = exit_logits(model, hs, layer)
        losses.append(F.cross_entropy(logits.reshape(-1, vocab).float(), targets))
    return losses


def sample_windows(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` consecutive tokens, ``[batch, seq_len+1]``."""
    n_starts = stream.numel() - seq_len
    if n_starts < 1:
        raise ValueError(f"token stream of {stream.numel()} tokens is too short for windows of {seq_len + 1}")
    starts = torch.randint(0, n_starts, (batch,), generator=generator)
    return stream[starts[:, None] + torch.arange(seq_len + 1)]


#: Batches are split into chunks whose fp32 logits stay under this size, and gradients
#: are accumulated over the chunks. Larger tensors exceed glibc's mmap threshold (32 MiB
#: at most), so every step would map and unmap them afresh: measured on the tiny target
#: (8 x 256 tokens, vocab 4096) that is 168k page faults per step against 4k when split.
LOGITS_CHUNK_BYTES = 16 * 2**20


def windows_per_chunk(seq_len: int, vocab_size: int) -> int:
    return max(1, LOGITS_CHUNK_BYTES // (seq_len * vocab_size * 4))


def lr_factor(step: int, total: int, warmup: int, min_frac: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_frac``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _derive_seed(seed: int, role: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{role}".encode()).digest()[:7], "big")


@contextlib.contextmanager
def _seeded_deterministic(seed: int):
    """Seed torch's global RNG and enable deterministic algorithms, restoring both after."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _bf16_supported() -> bool:
    env = os.environ.get("SPECTUNE_BUILD_BF16")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # private API; absent or failing: assume no fast bf16
        return False


def _new_model(spec: ModelSpec, preset: Preset, seed: int, role: str):
    from transformers import GenerationConfig, LlamaForCausalLM

    config = make_config(spec, preset.vocab_size, preset.max_position_embeddings)
    with _seeded_deterministic(_derive_seed(seed, role + ":init")):
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


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
    n_layers = model.config.num_hidden_layers
    weights = exit_loss_weights(n_layers) if early_exit else [1.0]
    chunk = windows_per_chunk(spec.seq_len, model.config.vocab_size)
    gen = torch.Generator().manual_seed(_derive_seed(seed, role + ":batches"))
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    final_losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    with _seeded_deterministic(_derive_seed(seed, role + ":train")), tqdm(
        total=spec.steps, desc=desc or role, disable=not progress, dynamic_ncols=True, leave=True
    ) as bar:
        for step in range(spec.steps):
            windows = sample_windows(stream, spec.batch, spec.seq_len, gen)
            opt.zero_grad(set_to_none=True)
            step_losses = [0.0] * len(weights)
            for part in windows.split(chunk):
                frac = part.shape[0] / windows.shape[0]
                with autocast:
                    losses = layer_losses(model, part, all_layers=early_exit and n_layers > 1)
                loss = sum(w * l for w, l in zip(weights, losses)) * frac
                loss.backward()
                step_losses = [a + l.item() * frac for a, l in zip(step_losses, losses)]
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            opt.step()
            sched.step()
            final_losses.append(step_losses[-1])
            bar.update(1)
            if step % 10 == 0 or step == spec.steps - 1:
                postfix = {"loss": f"{step_losses[-1]:.3f}", "lr": f"{sched.get_last_lr()[0]:.1e}"}
                if len(step_losses) > 1:
                    postfix["exit1"] = f"{step_losses[0]:.3f}"
                bar.set_postfix(postfix)
    seconds = time.perf_counter() - t0
    model.eval()
    tail = final_losses[-max(1, len(final_losses) // 10):]
    return {
        "train_seconds": round(seconds, 2),
        "train_loss_final": round(sum(tail) / len(tail), 4),
        "precision": "bf16-autocast" if bf16 else "fp32",
        "chunks_per_batch": math.ceil(spec.batch / chunk),
        "exit_loss_weights": [round(w, 6) for w in weights],
    }


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, n_windows: int, seq_len: int, all_layers: bool) -> list[float]:
    """Mean held-out CE per exit layer (or just the final layer) over fixed windows, fp32."""
    batch = windows_per_chunk(seq_len, model.config.vocab_size)
    gen = torch.Generator().manual_seed(EVAL_SEED)
    windows = sample_windows(stream, n_windows, seq_len, gen)
    model.eval()
    sums: list[float] | None = None
    for i in range(0, n_windows, batch):
        chunk = windows[i : i + batch]
        losses = layer_losses(model, chunk, all_layers=all_layers)
        vals = [float(l) * chunk.shape[0] for l in losses]
        sums = vals if sums is None else [a + b for a, b in zip(sums, vals)]
    assert sums is not None
    return [s / n_windows for s in sums]


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# Cache, output directory
# ---------------------------------------------------------------------------------------


def _effective_spec(spec: ModelSpec, steps: int | None) -> ModelSpec:
    return spec if steps is None else replace(spec, steps=int(steps))


def read_card(out: Path) -> dict | None:
    try:
        return json.loads((Path(out) / "card.json").read_text())
    except (OSError, ValueError):
        return None


def _is_cached(out: Path, preset: Preset, seed: int, target: ModelSpec, drafter: ModelSpec) -> bool:
    card = read_card(out)
    if not card:
        return False
    try:
        if (
            card.get("builder_version") != BUILDER_VERSION
            or card.get("preset") != preset.name
            or card.get("seed") != seed
            or card["target"]["train_steps"] != target.steps
            or card["drafter"]["train_steps"] != drafter.steps
            or card.get("preset_spec") != json.loads(json.dumps(asdict(preset)))
        ):
            return False
    except (KeyError, TypeError):
        return False
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # from_pretrained shows a "Loading weights" bar
    try:
        for role in ("target", "drafter"):
            path = Path(out) / role
            if AutoConfig.from_pretrained(path).vocab_size != card["vocab_size"]:
                return False
            AutoModelForCausalLM.from_pretrained(path)
            AutoTokenizer.from_pretrained(path)
    except Exception:
        return False
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return True


def _prepare_out(out: Path) -> Path:
    """Create ``out`` and check it is writable, with a message that says what to do."""
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise type(exc)(
            exc.errno,
            f"cannot write the model pair to {out}: {exc.strerror or exc}. "
            "Pass another output directory or set SPECTUNE_CACHE to a writable folder",
        ) from exc
    return out


@contextlib.contextmanager
def _build_lock(out: Path):
    """An exclusive lock on ``out/.build.lock`` so concurrent builders (pytest-xdist
    workers, two shells) do not write the same pair at once; the second one then finds
    the first one's result in the cache."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(out / ".build.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[spectune models build] {msg}", file=sys.stderr, flush=True)


def _save(model, tokenizer, path: Path, progress: bool) -> None:
    from transformers.utils import logging as hf_logging

    if path.exists():
        shutil.rmtree(path)
    quiet = not progress and hf_logging.is_progress_bar_enabled()
    if quiet:  # transformers 5 shows a "Writing model shards" bar of its own
        hf_logging.disable_progress_bar()
    try:
        # transformers 5 always writes safetensors (its `safe_serialization` argument is gone).
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def _swap_in(new: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.rename(dest, old)
    os.rename(new, dest)
    if old.exists():
        shutil.rmtree(old)


def _model_card_entry(spec: ModelSpec, model, stats: dict) -> dict:
    return {
        "n_layers": spec.n_layers,
        "hidden_size": spec.hidden_size,
        "n_heads": spec.n_heads,
        "intermediate_size": spec.intermediate_size,
        "n_params": count_params(model),
        "train_steps": spec.steps,
        "batch": spec.batch,
        "seq_len": spec.seq_len,
        "lr": spec.lr,
        "train_tokens": spec.steps * spec.batch * spec.seq_len,
        **stats,
    }


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------


def build_pair(
    preset: str,
    out: Path,
    seed: int = 0,
    *,
    force: bool = False,
    progress: bool = True,
    steps: int | None = None,
) -> Path:
    """Train and save a target/drafter pair; return ``out``.

    If ``out/card.json`` exists with the same preset, seed and step counts, and both
    model directories load, nothing is trained (cached) unless ``force``. ``steps``
    overrides the number of training steps of both models (tests use a few).
    """
    p = get_preset(preset)
    if steps is not None and int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    seed = int(seed)
    target_spec = _effective_spec(p.target, steps)
    drafter_spec = _effective_spec(p.drafter, steps)
    out = _prepare_out(Path(out))

    with _build_lock(out):
        if not force and _is_cached(out, p, seed, target_spec, drafter_spec):
            _log(progress, f"using the cached {preset} pair at {out}")
            return out
        (out / "card.json").unlink(missing_ok=True)  # a partial build must not look complete
        t_start = time.perf_counter()

        # 1. corpus + tokenizer (tokenized once, shared by both models)
        corpus: Corpus = load_corpus(p.max_train_bytes, p.max_heldout_bytes)
        _log(progress, f"corpus: {len(corpus.train)} train files ({corpus.train_bytes:,} B), "
                       f"{len(corpus.heldout)} held-out ({corpus.heldout_bytes:,} B)")
        t0 = time.perf_counter()
        tok = train_tokenizer((f.text for f in corpus.train), p.vocab_size)
        train_stream = encode_stream(tok, [f.text for f in corpus.train])
        held_stream = encode_stream(tok, [f.text for f in corpus.heldout])
        tokenizer_seconds = time.perf_counter() - t0
        vocab_size = tok.get_vocab_size()
        if vocab_size != p.vocab_size:
            raise RuntimeError(f"tokenizer has {vocab_size} tokens, preset {preset} expects {p.vocab_size}")
        hf_tok = wrap_tokenizer(tok, p.max_position_embeddings)
        _log(progress, f"tokenizer: vocab {vocab_size}, {train_stream.numel():,} train / "
                       f"{held_stream.numel():,} held-out tokens ({tokenizer_seconds:.1f} s)")

        bf16 = p.bf16_autocast and _bf16_supported()

        # 2. target with early-exit loss on every layer
        target = _new_model(target_spec, p, seed, "target")
        t_stats = train_model(target, train_stream, target_spec, seed, "target", early_exit=True,
                              bf16=bf16, progress=progress, desc=f"{preset} target")
        with _seeded_deterministic(EVAL_SEED):
            t_eval = evaluate(target, held_stream, p.eval_windows, p.eval_seq_len, all_layers=True)
        _log(progress, "target held-out loss per exit layer: " + ", ".join(f"{x:.3f}" for x in t_eval))

        # 3. drafter, plain next-token loss
        drafter = _new_model(drafter_spec, p, seed, "drafter")
        d_stats = train_model(drafter, train_stream, drafter_spec, seed, "drafter", early_exit=False,
                              bf16=bf16, progress=progress, desc=f"{preset} drafter")
        with _seeded_deterministic(EVAL_SEED):
            d_eval = evaluate(drafter, held_stream, p.eval_windows, p.eval_seq_len, all_layers=False)
        _log(progress, f"drafter held-out loss: {d_eval[0]:.3f}")

        # 4. save: into hidden folders first, then swap them in (a reader of the old
        # pair never sees a half-written model directory)
        for role, model in (("target", target), ("drafter", drafter)):
            _save(model, hf_tok, out / f".{role}.new", progress)
        for role in ("target", "drafter"):
            _swap_in(out / f".{role}.new", out / role)
        import tokenizers
        import transformers

        n_tok_train = int(train_stream.numel())
        n_tok_held = int(held_stream.numel())
        card = {
            "builder_version": BUILDER_VERSION,
            "preset": p.name,
            "description": p.description,
            "seed": seed,
            "steps_override": None if steps is None else int(steps),
            "vocab_size": vocab_size,
            "max_position_embeddings": p.max_position_embeddings,
            "special_tokens": {"eos": EOS_TOKEN, "bos": EOS_TOKEN, "pad": PAD_TOKEN,
                               "eos_id": EOS_ID, "bos_id": EOS_ID, "pad_id": PAD_ID},
            "target": {
                **_model_card_entry(target_spec, target, t_stats),
                "heldout_loss_per_layer": [round(x, 5) for x in t_eval],
                "heldout_loss": round(t_eval[-1], 5),
            },
            "drafter": {
                **_model_card_entry(drafter_spec, drafter, d_stats),
                "heldout_loss": round(d_eval[0], 5),
            },
            "eval": {
                "n_windows": p.eval_windows,
                "seq_len": p.eval_seq_len,
                "window_seed": EVAL_SEED,
                "uniform_loss": round(math.log(vocab_size), 5),
                "note": "mean next-token CE (nats/token) on held-out stdlib files; "
                        "target per layer: exit after layer i+1 through the final norm and lm_head",
            },
            "tokenizer": {
                "type": "byte-level BPE (tokenizers)",
                "train_tokens": n_tok_train,
                "heldout_tokens": n_tok_held,
                "bytes_per_token_train": round(corpus.train_bytes / n_tok_train, 4),
                "bytes_per_token_heldout": round(corpus.heldout_bytes / n_tok_held, 4),
                "seconds": round(tokenizer_seconds, 2),
            },
            "corpus": corpus.describe(),
            "total_seconds": round(time.perf_counter() - t_start, 2),
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
                "torch_threads": torch.get_num_threads(),
                "machine": platform.machine(),
            },
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "preset_spec": asdict(p),
        }
        tmp = out / "card.json.tmp"
        tmp.write_text(json.dumps(card, indent=2) + "\n")
        os.replace(tmp, out / "card.json")
        _log(progress, f"saved the {preset} pair to {out} in {card['total_seconds']:.1f} s")
    return out
