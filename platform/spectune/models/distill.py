"""``spectune models distill``: a small drafter trained by knowledge distillation from a pair's target.

For an imported target (``spectune models import``) there is no drafter with its tokenizer, so
one is made here, offline and deterministically:

1. text: the stdlib code stream (:mod:`.corpus`) and, when the target has a chat template, its
   own greedy answers to instructions made from the stdlib (:mod:`.distill_data`);
2. a small ``LlamaForCausalLM`` with the target's tokenizer, its tied embedding started from the
   target's embedding projected on its top principal directions (the output layer then starts
   close to the target's instead of at random);
3. training on teacher-forced target logits: cross-entropy to the target's top-k probabilities
   plus the mass outside them as one bucket (the KL divergence of the coarsened distributions),
   AdamW with warm-up/cosine (:mod:`.training`), seeded (:mod:`.seeding`);
4. the card entry: top-1 agreement with the target on held-out code and on held-out answers
   (what predicts acceptance), and the drafter's one-token pass time against the target's.

The drafter goes into ``PAIR/drafter`` beside ``PAIR/target``, so the folder is a pair like a
built one. Cached: a second call with the same spec, seed and target does nothing.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .card import count_params, read_card, write_card
from .corpus import load_corpus
from .distill_data import instructions
from .evaluate import EVAL_SEED
from .losses import sample_windows, windows_per_chunk
from .presets import ModelSpec
from .seeding import derive_seed, seeded_deterministic
from .training import _optimizer, make_config

#: Bumped when a change here changes what a distillation produces; older drafters are redone.
DISTILL_VERSION = 1


@dataclass(frozen=True)
class DistillSpec:
    """The drafter's shape and schedule, and the text it learns from."""

    drafter: ModelSpec
    chat_windows: int = 3  # of each batch's windows, from the target's answers (the rest: code)
    code_bytes: int = 4_000_000
    heldout_code_bytes: int = 400_000
    answers: int = 224  # instructions the target answers for training
    heldout_answers: int = 32
    answer_tokens: int = 128
    answer_batch: int = 32
    top_k: int = 64
    eval_windows: int = 16
    max_cost_ratio: float = 0.10  # a drafter pass may cost at most this share of a target pass


#: For SmolLM2-135M-Instruct (30 layers, d=576, vocab 49152): 2 layers at d=256 cost ~8% of a
#: target pass here (the 49152-row output layer dominates it); 15-30 minutes on 2 cores (measured: 30.5 min at 1 thread).
SMOLLM2_DRAFTER = DistillSpec(
    ModelSpec(n_layers=2, hidden_size=256, n_heads=4, intermediate_size=704, steps=240, batch=8, seq_len=256,
              lr=2e-3, warmup_frac=0.05, min_lr_frac=0.05, weight_decay=0.0),
)


@dataclass(frozen=True)
class Sample:
    prompt: list[int]  # the chat-templated instruction
    answer: list[int]  # the target's greedy answer (eos included when it stopped)
    category: str


def distill_drafter(pair_dir: Path, spec: DistillSpec = SMOLLM2_DRAFTER, seed: int = 0, *, steps: int | None = None,
                    force: bool = False, progress: bool = True, threads: int | None = None) -> Path:
    """Distil a drafter into ``pair_dir/drafter`` from ``pair_dir/target``; return ``pair_dir``.

    ``threads``: torch threads for the build (default: torch's). On a shared machine one thread
    loses far less to other processes than two whose barriers wait on a descheduled thread."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return _distill(Path(pair_dir).expanduser(), spec, seed, steps, force, progress)
    finally:
        torch.set_num_threads(previous)


def _distill(pair_dir: Path, spec: DistillSpec, seed: int, steps: int | None, force: bool, progress: bool) -> Path:
    from .cache import build_lock, save_pair

    if not (pair_dir / "target" / "config.json").is_file():
        raise ValueError(f"{pair_dir} has no target/ model: import one first (`spectune models import smollm2`)")
    spec = spec if steps is None else replace(spec, drafter=replace(spec.drafter, steps=int(steps)))
    with build_lock(pair_dir):
        card = read_card(pair_dir) or {}
        if not force and _is_cached(pair_dir, card, spec, seed):
            _log(progress, f"using the cached drafter at {pair_dir / 'drafter'}")
            return pair_dir
        started = time.perf_counter()
        teacher, reference, tokenizer = _load_target(pair_dir / "target")
        corpus = load_corpus(spec.code_bytes, spec.heldout_code_bytes)
        code, heldout_code = (_code_stream(tokenizer, files) for files in (corpus.train, corpus.heldout))
        train_answers, heldout_answers = _cached_answers(pair_dir, card, teacher, tokenizer, corpus, spec, seed, progress)
        drafter = _new_drafter(spec.drafter, reference, seed)
        stats = _train(drafter, teacher, code, _chat_stream(train_answers), spec, seed, progress)
        entry = {
            "distill_version": DISTILL_VERSION, "seed": seed, "spec": asdict(spec), "target_sha256": _target_id(card),
            "n_params": count_params(drafter), "train": {**stats, "torch_threads": torch.get_num_threads()},
            "data": {"code_tokens": int(code.numel()), "answers": len(train_answers),
                     "answer_tokens": sum(len(s.answer) for s in train_answers),
                     "categories": sorted({s.category for s in train_answers})},
            "heldout": _evaluate(drafter, reference, heldout_code, heldout_answers, spec),
            "cost": _pass_cost(drafter, reference, teacher, code, spec.max_cost_ratio),
        }
        save_pair(pair_dir, {"drafter": drafter}, tokenizer, progress)
        entry["seconds"] = round(time.perf_counter() - started, 1)
        write_card(pair_dir, {**card, "drafter": entry})
        _log(progress, f"drafter ready in {entry['seconds']:.0f} s: top-1 agreement {entry['heldout']['agreement_code']:.3f} "
                       f"(code), {entry['heldout']['agreement_answers']} (answers); one pass "
                       f"{entry['cost']['float32']['ratio']:.1%} of the target's")
    return pair_dir


def _is_cached(pair_dir: Path, card: dict, spec: DistillSpec, seed: int) -> bool:
    entry = card.get("drafter") or {}
    return (entry.get("distill_version") == DISTILL_VERSION and entry.get("seed") == seed
            and entry.get("spec") == _json(asdict(spec)) and entry.get("target_sha256") == _target_id(card)
            and (pair_dir / "drafter" / "model.safetensors").is_file())


def _json(value):
    import json

    return json.loads(json.dumps(value))


def _target_id(card: dict) -> str | None:
    return (card.get("source") or {}).get("sha256")


def _load_target(path: Path):
    """The target twice: bf16 as the teacher (3x faster here), fp32 as the reference agreement is measured on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return teacher, reference, tokenizer


def _code_stream(tokenizer, files) -> torch.Tensor:
    """Every file's tokens, each followed by the end-of-sequence token: [N]."""
    separator = tokenizer.eos_token_id
    ids: list[int] = []
    for f in files:
        ids.extend(tokenizer.encode(f.text, add_special_tokens=False))
        ids.append(separator)
    return torch.tensor(ids, dtype=torch.long)


def _chat_stream(samples: list[Sample]) -> torch.Tensor | None:
    ids = [t for s in samples for t in (*s.prompt, *s.answer)]
    return torch.tensor(ids, dtype=torch.long) if ids else None


def _cached_answers(pair_dir: Path, card: dict, teacher, tokenizer, corpus, spec: DistillSpec, seed: int,
                    progress: bool) -> tuple[list[Sample], list[Sample]]:
    """The target's answers (train, held-out), generated once per target, seed and answer settings and kept
    in ``pair_dir/.distill/`` (generation is a few minutes of a build that may be interrupted)."""
    import hashlib
    import json

    key = json.dumps([DISTILL_VERSION, _target_id(card), seed, spec.answers, spec.heldout_answers, spec.answer_tokens,
                      spec.answer_batch, spec.code_bytes, spec.heldout_code_bytes, torch.get_num_threads()])
    path = pair_dir / ".distill" / f"answers-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        saved = json.loads(path.read_text())
        return tuple([Sample(**s) for s in saved[part]] for part in ("train", "heldout"))  # type: ignore[return-value]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    train = _answers(teacher, tokenizer, instructions(corpus.train, spec.answers, seed), spec, progress)
    heldout = _answers(teacher, tokenizer, instructions(corpus.heldout, spec.heldout_answers, seed + 1), spec, progress)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"train": [asdict(s) for s in train], "heldout": [asdict(s) for s in heldout]}))
    tmp.replace(path)
    return train, heldout


@torch.inference_mode()
def _answers(teacher, tokenizer, prompts: list[tuple[str, str]], spec: DistillSpec, progress: bool) -> list[Sample]:
    """The target's greedy answers, generated in length-sorted batches (little padding)."""
    from tqdm.auto import tqdm

    if not getattr(tokenizer, "chat_template", None) or not prompts:
        return []
    encoded = [(category, chat_ids(tokenizer, text)) for category, text in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][1]))
    samples: dict[int, Sample] = {}
    batches = [order[i : i + spec.answer_batch] for i in range(0, len(order), spec.answer_batch)]
    for batch in tqdm(batches, desc="target answers", disable=not progress, dynamic_ncols=True):
        for i, answer in zip(batch, generate_replies(teacher, tokenizer, [encoded[i][1] for i in batch], spec.answer_tokens)):
            samples[i] = Sample(encoded[i][1], answer, encoded[i][0])
    return [samples[i] for i in range(len(encoded))]


def chat_ids(tokenizer, request: str) -> list[int]:
    """One user request through the tokenizer's chat template, ready for the assistant's reply."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


@torch.inference_mode()
def generate_replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                     seed: int = 0) -> list[list[int]]:
    """The model's replies to `prompts` (left-padded into one batch), each cut after eos: greedy at temperature 0,
    else sampled with torch's generator seeded by `seed` (the same batch gives the same replies)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # [B, width], padded on the left
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [B, width]
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        torch.manual_seed(seed)  # generate draws from torch's global generator
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                         **sampling)  # [B, width + new]
    answers = []
    for row in out[:, width:].tolist():
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        answers.append(row[:end])
    return answers


def _new_drafter(spec: ModelSpec, target, seed: int):
    """A small Llama with the target's vocabulary, special ids and rotary base; its tied embedding is the
    target's embedding projected on the target embedding's top `hidden_size` principal directions."""
    from transformers import GenerationConfig, LlamaForCausalLM

    tc = target.config
    config = make_config(spec, tc.vocab_size, tc.max_position_embeddings)
    config.tie_word_embeddings = True
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tc.bos_token_id, tc.eos_token_id, tc.pad_token_id
    config.rope_parameters = dict(tc.rope_parameters)
    with seeded_deterministic(derive_seed(seed, "drafter:init")):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        embedding = target.get_input_embeddings().weight.float()  # [V, D]
        _, _, vh = torch.linalg.svd(embedding - embedding.mean(0), full_matrices=False)  # vh: [D, D]
        projected = embedding @ vh[: spec.hidden_size].T  # [V, d]
        model.get_input_embeddings().weight.copy_(projected)
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id,
                                               pad_token_id=tc.pad_token_id)
    return model


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Cross-entropy from the teacher's top-k probabilities (+ the rest as one bucket) to the student's.

    student_logits, teacher_logits: [N, V]. The coarsened teacher distribution is exact on its
    top k tokens and keeps the remaining mass, so the loss is zero only where the student agrees.
    """
    log_q = F.log_softmax(student_logits.float(), dim=-1)  # [N, V]
    p = F.softmax(teacher_logits.float(), dim=-1)  # [N, V]
    p_top, index = p.topk(top_k, dim=-1)  # [N, k]
    log_q_top = log_q.gather(-1, index)  # [N, k]
    p_rest = (1 - p_top.sum(-1)).clamp_min(0)  # [N]
    log_q_rest = torch.log1p(-log_q_top.exp().sum(-1).clamp_max(1 - 1e-6))  # [N]
    return -((p_top * log_q_top).sum(-1) + p_rest * log_q_rest).mean()


def _train(model, teacher, code: torch.Tensor, chat: torch.Tensor | None, spec: DistillSpec, seed: int,
           progress: bool) -> dict:
    """KD over windows drawn from the code and answer streams (each batch: `chat_windows` from answers)."""
    from tqdm.auto import tqdm

    ms = spec.drafter
    chat_windows = spec.chat_windows if chat is not None and chat.numel() > ms.seq_len + 1 else 0
    opt, sched = _optimizer(model, ms)
    chunk = windows_per_chunk(ms.seq_len, model.config.vocab_size)
    gen = torch.Generator().manual_seed(derive_seed(seed, "drafter:batches"))
    losses, agreements = [], []
    model.train()
    started = time.perf_counter()
    with seeded_deterministic(derive_seed(seed, "drafter:train")), tqdm(
            total=ms.steps, desc="distil drafter", disable=not progress, dynamic_ncols=True) as bar:
        for step in range(ms.steps):
            windows = sample_windows(code, ms.batch - chat_windows, ms.seq_len, gen)  # [b, T+1]
            if chat_windows:
                windows = torch.cat([windows, sample_windows(chat, chat_windows, ms.seq_len, gen)])
            loss, agreement = _step(model, teacher, opt, windows[:, :-1], chunk, spec.top_k, ms.grad_clip)
            sched.step()
            losses.append(loss)
            agreements.append(agreement)
            bar.update(1)
            if step % 10 == 0 or step == ms.steps - 1:
                bar.set_postfix(kd=f"{loss:.3f}", agree=f"{agreement:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
    model.eval()
    tail = max(1, len(losses) // 10)
    return {"steps": ms.steps, "train_seconds": round(time.perf_counter() - started, 1),
            "train_tokens": ms.steps * ms.batch * ms.seq_len, "kd_loss_final": round(sum(losses[-tail:]) / tail, 4),
            "agreement_final": round(sum(agreements[-tail:]) / tail, 4), "teacher_dtype": "bfloat16"}


def _step(model, teacher, opt, inputs: torch.Tensor, chunk: int, top_k: int, grad_clip: float) -> tuple[float, float]:
    """One optimizer step, gradients accumulated over chunks of windows (fp32 logits stay small)."""
    opt.zero_grad(set_to_none=True)
    loss_sum, agree_sum = 0.0, 0.0
    for part in inputs.split(chunk):  # part: [c, T]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=part, use_cache=False).logits.flatten(0, 1)  # [c*T, V]
        student_logits = model(input_ids=part, use_cache=False).logits.flatten(0, 1)  # [c*T, V]
        frac = part.shape[0] / inputs.shape[0]
        loss = kd_loss(student_logits, teacher_logits, top_k) * frac
        loss.backward()
        loss_sum += loss.item()
        agree_sum += (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item() * frac
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss_sum, agree_sum


@torch.inference_mode()
def _evaluate(drafter, reference, code: torch.Tensor, answers: list[Sample], spec: DistillSpec) -> dict:
    """Top-1 agreement with the fp32 target: on fixed held-out code windows, and on held-out answers
    (answer positions only: the tokens a drafter is asked to predict while decoding)."""
    windows = sample_windows(code, spec.eval_windows, spec.drafter.seq_len, torch.Generator().manual_seed(EVAL_SEED))
    agree, total = 0, 0
    for window in windows[:, :-1]:  # [T]
        a, n = _agreement(drafter, reference, window.tolist(), 0)
        agree, total = agree + a, total + n
    result = {"agreement_code": round(agree / total, 4), "code_tokens": total, "agreement_answers": None}
    if answers:
        agree, total = 0, 0
        for s in answers:
            a, n = _agreement(drafter, reference, s.prompt + s.answer, len(s.prompt) - 1)
            agree, total = agree + a, total + n
        result.update(agreement_answers=round(agree / total, 4), answer_tokens=total, answers=len(answers))
    return result


def _agreement(drafter, reference, ids: list[int], start: int) -> tuple[int, int]:
    """How many next-token argmaxes from position `start` on (excluding the last) the two models share."""
    x = torch.tensor([ids])  # [1, n]
    d = drafter(input_ids=x, use_cache=False).logits[0, start:-1].argmax(-1)  # [n-1-start]
    t = reference(input_ids=x, use_cache=False).logits[0, start:-1].argmax(-1)
    return int((d == t).sum()), int(d.numel())


def _pass_cost(drafter, reference, teacher, code: torch.Tensor, budget: float) -> dict:
    """One-token forward time (fastest of 9, 128 cached tokens, 1 thread) of drafter and target, fp32 and bf16."""
    from spectune.profiling import profile_forwards

    filler = code[:129].tolist()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cost = {}
        for name, target, draft in (("float32", reference, drafter), ("bfloat16", teacher, _bf16_copy(drafter))):
            target_ms = profile_forwards(target, filler, 128, 1, 9)[0]
            drafter_ms = profile_forwards(draft, filler, 128, 1, 9)[0]
            cost[name] = {"target_ms": round(target_ms, 2), "drafter_ms": round(drafter_ms, 2),
                          "ratio": round(drafter_ms / target_ms, 4)}
    finally:
        torch.set_num_threads(threads)
    return {**cost, "torch_threads": 1, "past": 128, "budget_ratio": budget,
            "within_budget": all(c["ratio"] <= budget for c in cost.values())}


def _bf16_copy(model):
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[spectune models distill] {msg}", file=sys.stderr, flush=True)
