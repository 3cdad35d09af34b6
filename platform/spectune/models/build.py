"""``spectune models build``: train a small target/drafter pair from scratch, offline.

No machine here can download weights, so the project builds its own pairs on a corpus
every machine has (the Python standard library's source, see :mod:`.corpus`):

1. a byte-level BPE tokenizer (``tokenizers``), shared by both models;
2. a *target* ``LlamaForCausalLM`` (the hybrid presets: a ``BambaForCausalLM`` of Mamba-2 and
   attention layers, plain next-token loss) trained with an early-exit loss on every layer
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

This module is the recipe; each step lives with its concern: :mod:`.presets` (sizes and
schedules), :mod:`.corpus`, :mod:`.tokenizer`, :mod:`.losses` (windows, per-exit-layer
loss), :mod:`.training`, :mod:`.evaluate`, :mod:`.seeding`, :mod:`.cache` (lock, cache
check, atomic swap-in) and :mod:`.card`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .cache import build_lock, is_cached, prepare_out, save_pair
from .card import make_card, write_card
from .corpus import Corpus, load_corpus
from .evaluate import evaluate_seeded
from .presets import ModelSpec, Preset, effective_spec, get_preset
from .tokenizer import Tokenized, tokenize_corpus
from .training import TrainedModel, bf16_supported, new_model, train_model


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[spectune models build] {msg}", file=sys.stderr, flush=True)


def _load_and_tokenize(p: Preset, progress: bool) -> tuple[Corpus, Tokenized]:
    """The corpus and its token streams (tokenized once, shared by both models)."""
    corpus = load_corpus(p.max_train_bytes, p.max_heldout_bytes)
    _log(progress, f"corpus: {len(corpus.train)} train files ({corpus.train_bytes:,} B), "
                   f"{len(corpus.heldout)} held-out ({corpus.heldout_bytes:,} B)")
    tokens = tokenize_corpus(corpus, p)
    _log(progress, f"tokenizer: vocab {tokens.vocab_size}, {tokens.train.numel():,} train / "
                   f"{tokens.heldout.numel():,} held-out tokens ({tokens.seconds:.1f} s)")
    return corpus, tokens


def _train_and_evaluate(role: str, spec: ModelSpec, p: Preset, seed: int, tokens: Tokenized,
                        *, early_exit: bool, bf16: bool, progress: bool) -> TrainedModel:
    """Train one model of the pair (the target with the early-exit loss on every layer,
    the drafter with plain next-token loss) and score it on the held-out stream."""
    model = new_model(spec, p, seed, role)
    stats = train_model(model, tokens.train, spec, seed, role, early_exit=early_exit,
                        bf16=bf16, progress=progress, desc=f"{p.name} {role}")
    heldout = evaluate_seeded(model, tokens.heldout, p.eval_windows, p.eval_seq_len, all_layers=early_exit)
    if early_exit:
        _log(progress, f"{role} held-out loss per exit layer: " + ", ".join(f"{x:.3f}" for x in heldout))
    else:
        _log(progress, f"{role} held-out loss: {heldout[0]:.3f}")
    return TrainedModel(spec, model, stats, heldout)


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
    target_spec, drafter_spec = effective_spec(p.target, steps), effective_spec(p.drafter, steps)
    out = prepare_out(Path(out))

    with build_lock(out):
        if not force and is_cached(out, p, seed, target_spec, drafter_spec):
            _log(progress, f"using the cached {preset} pair at {out}")
            return out
        (out / "card.json").unlink(missing_ok=True)  # a partial build must not look complete
        t_start = time.perf_counter()
        # 1. corpus + tokenizer (tokenized once, shared by both models)
        corpus, tokens = _load_and_tokenize(p, progress)
        bf16 = p.bf16_autocast and bf16_supported()
        # 2. target with early-exit loss on every layer (a hybrid target: plain next-token loss, nothing
        # self-speculates on it)
        target = _train_and_evaluate("target", target_spec, p, seed, tokens,
                                     early_exit=target_spec.ssm is None, bf16=bf16, progress=progress)
        # 3. drafter, plain next-token loss
        drafter = _train_and_evaluate("drafter", drafter_spec, p, seed, tokens,
                                      early_exit=False, bf16=bf16, progress=progress)
        # 4. save: into hidden folders first, then swap them in (a reader of the old
        # pair never sees a half-written model directory); the card last, atomically
        save_pair(out, {"target": target.model, "drafter": drafter.model}, tokens.tokenizer, progress)
        card = make_card(p, seed, steps, corpus, tokens, target, drafter, time.perf_counter() - t_start)
        write_card(out, card)
        _log(progress, f"saved the {preset} pair to {out} in {card['total_seconds']:.1f} s")
    return out
