"""Training each kind of head from the cached features, and scoring it against the target on held-out text.

Every kind learns the target's own next-token distribution (its top-k logits, renormalised over the
draft vocabulary): what matters for acceptance is agreeing with the target, not with the corpus.

    medusa  head k on the feature at t            -> the target's distribution at t+k (token t+k+1)
    hydra   head k on [feature t, embeddings of tokens t+1..t+k] -> the same
    eagle   the layer over (feature t, token t+1) -> the feature at t+1 (smooth L1) and the target's
            distribution there; unrolled `n_heads` steps on its own outputs (training-time test, as
            EAGLE-3 trains), so step s learns what drafting depth s sees
    eagle3  the same over fc(low, middle, high) with its own norm and LM head, distribution only
    ppd     the frozen target itself over the window with m prompt tokens after each of A anchors (a tree
            mask: prompt k after anchor t sees tokens 0..t and prompts 1..k) -> prompt k at t learns the
            target's distribution at t+k; the gradient flows through the target into the prompts only

Deterministic: a seeded generator picks the batches, the init and the training run under
`spectune.models.seeding.seeded_deterministic`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spectune.engine.kvcache import KVCache
from spectune.heads.modules import EagleDraft, HydraHeads, MedusaHeads, PromptTokens
from spectune.heads.vocab import DraftVocab
from spectune.models.seeding import derive_seed, seeded_deterministic
from spectune.models.training import bf16_supported, lr_factor
from spectune.trees.draft import additive_mask

POSITION_DECAY = 0.8  # weight of head / step k's loss: 0.8^(k-1) (Medusa's and EAGLE-3's decay)
FEATURE_WEIGHT = 1.0  # EAGLE: smooth-L1 on the next feature beside 0.1 x the distribution loss
DISTRIBUTION_WEIGHT = 0.1


@dataclass(frozen=True)
class TrainOptions:
    steps: int
    batch: int  # windows per step
    lr: float
    seed: int = 0
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass(frozen=True)
class Frozen:
    """What the heads read from the target and never change: its LM head rows and input embeddings (fp32)."""

    readout: torch.Tensor  # [V', d] the LM head's rows of the draft vocabulary
    embeddings: torch.Tensor  # [V, d]
    vocab: DraftVocab

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.readout)  # [..., d] -> [..., V'] (F.linear: its backward is ~10x faster than `@ W.T`)


def soft_targets(top_ids: torch.Tensor, top_logits: torch.Tensor, vocab: DraftVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's top-k distribution over the draft vocabulary: (indices into it [.., k], probabilities [.., k]).

    Tokens outside the draft vocabulary get probability 0 (index 0, never weighted); the rest is renormalised.
    """
    index = vocab.index_of(top_ids.long())  # [.., k], -1 outside
    probs = torch.softmax(top_logits.float(), dim=-1) * (index >= 0)  # [.., k]
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return index.clamp(min=0), probs


def distribution_loss(logits: torch.Tensor, top_ids: torch.Tensor, top_logits: torch.Tensor, vocab: DraftVocab) -> torch.Tensor:
    """Cross-entropy of draft logits [.., V'] against the target's renormalised top-k distribution."""
    index, probs = soft_targets(top_ids, top_logits, vocab)
    log_q = torch.log_softmax(logits.float(), dim=-1).gather(-1, index)  # [.., k]
    return -(probs * log_q).sum(dim=-1).mean()


def batches(n_windows: int, size: int, seed: int, role: str) -> Iterator[torch.Tensor]:
    """Window indices of each step, from a generator of their own (seeded by role)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, role))
    while True:
        yield torch.randint(n_windows, (size,), generator=generator)


def fit(module: nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], n_windows: int, options: TrainOptions,
        role: str, progress: bool) -> dict:
    """AdamW with warm-up and cosine decay over `options.steps` batches of windows; returns the training stats.

    Under bf16 autocast where the CPU has AMX tiles (`spectune.models.training.bf16_supported`, as the pair
    builder decides): the LM-head matmuls dominate and run ~4x faster there; weights stay fp32.
    """
    from tqdm.auto import tqdm

    bf16 = bf16_supported()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, betas=(0.9, 0.95), weight_decay=options.weight_decay)
    warmup = max(1, round(options.warmup_frac * options.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, options.steps, warmup, options.min_lr_frac))
    losses: list[float] = []
    started = time.perf_counter()
    module.train()
    with seeded_deterministic(derive_seed(options.seed, role + ":train")), tqdm(
        total=options.steps, desc=role, disable=not progress, dynamic_ncols=True
    ) as bar:
        for step, windows in zip(range(options.steps), batches(n_windows, options.batch, options.seed, role + ":batches")):
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                value = loss(windows)
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(float(value.detach()))
            bar.update(1)
            if step % 10 == 0 or step == options.steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    module.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"train_seconds": round(time.perf_counter() - started, 2), "train_loss_final": round(sum(tail) / len(tail), 4),
            "steps": options.steps, "batch_windows": options.batch, "lr": options.lr,
            "precision": "bf16-autocast" if bf16 else "fp32"}


# --- per kind: draft logits at every (position, head) of a batch of windows -----------------------


@dataclass(frozen=True)
class Predictions:
    """Draft logits per head position k = 1..K and the target's top-k where each is scored."""

    logits: list[torch.Tensor]  # k -> [B, n_k, V']
    top_ids: list[torch.Tensor]  # k -> [B, n_k, k_top]
    top_logits: list[torch.Tensor]
    features: list[tuple[torch.Tensor, torch.Tensor]]  # EAGLE: (predicted, true next feature) per step; else []


def medusa_predictions(heads: MedusaHeads, frozen: Frozen, data: dict[str, torch.Tensor], windows: torch.Tensor) -> Predictions:
    feature = data["last"][windows].float()  # [B, T, d]
    top_ids, top_logits = data["top_ids"][windows], data["top_logits"][windows]
    T = feature.shape[1]
    logits, ids, values = [], [], []
    for k, block in enumerate(heads.blocks, start=1):
        logits.append(frozen.logits(block(feature[:, : T - k])))  # [B, T-k, V'] token t+k+1 from the feature at t
        ids.append(top_ids[:, k:])
        values.append(top_logits[:, k:])
    return Predictions(logits, ids, values, [])


def hydra_predictions(heads: HydraHeads, frozen: Frozen, data: dict[str, torch.Tensor], windows: torch.Tensor) -> Predictions:
    feature = data["last"][windows].float()  # [B, T, d]
    embeds = frozen.embeddings[data["tokens"][windows].long()]  # [B, T, d]
    top_ids, top_logits = data["top_ids"][windows], data["top_logits"][windows]
    T = feature.shape[1]
    logits, ids, values = [], [], []
    for k in range(1, heads.n_heads + 1):
        before = torch.stack([embeds[:, j + 1 : T - k + j + 1] for j in range(k)], dim=2)  # [B, T-k, k, d] tokens t+1..t+k
        logits.append(frozen.logits(heads.head(k, feature[:, : T - k], before)))  # [B, T-k, V']
        ids.append(top_ids[:, k:])
        values.append(top_logits[:, k:])
    return Predictions(logits, ids, values, [])


def eagle_predictions(draft: EagleDraft, frozen: Frozen, data: dict[str, torch.Tensor], windows: torch.Tensor,
                      steps: int) -> Predictions:
    """Training-time test: step 1 runs the layer over every (feature t, token t+1); step s > 1 runs it over its
    own step s-1 outputs, each chain attending the true entries up to its start and its own earlier steps.

    Chain j (its last true entry at position j) predicts at step s the token j+s+1 (the target's distribution
    at j+s); every step keeps C = T - steps chains so the blocks of keys line up.
    """
    tokens = data["tokens"][windows].long()  # [B, T]
    last = data["last"][windows].float()  # [B, T, d]
    inputs = last if draft.version == 1 else data["fused"][windows].float().flatten(2)  # [B, T, d | 3d]
    top_ids, top_logits = data["top_ids"][windows], data["top_logits"][windows]
    B, T = tokens.shape
    C = T - steps
    cache = KVCache(draft.config).hf  # keys/values of every step, concatenated along the sequence
    hidden = draft.combine(inputs[:, : T - 1])  # [B, T-1, d] entries j = 0..T-2
    embeds = frozen.embeddings[tokens[:, 1:T]]  # [B, T-1, d] token j+1
    positions = torch.arange(T - 1).expand(B, -1)
    causal = torch.ones(T - 1, T - 1, dtype=torch.bool).tril()
    out_logits, out_next = draft(hidden, embeds, positions, additive_mask(causal, 0, hidden.dtype), cache)
    logits, ids, values, features = [], [], [], []
    chains = torch.arange(C)
    for s in range(1, steps + 1):
        if s > 1:
            embeds = frozen.embeddings[tokens[:, s : s + C]]  # [B, C, d] token j+s
            positions = (chains + s - 1).expand(B, -1)  # [B, C]
            mask = additive_mask(_ttt_allowed(T - 1, C, s), 0, hidden.dtype)  # [1, 1, C, (T-1) + (s-1)·C]
            out_logits, out_next = draft(hidden, embeds, positions, mask, cache)
        logits.append(frozen_or_own(draft, frozen, out_logits[:, :C]))  # [B, C, V']
        ids.append(top_ids[:, s : s + C])
        values.append(top_logits[:, s : s + C])
        features.append((out_next[:, :C], last[:, s : s + C]))
        hidden = out_next[:, :C]  # the next step reads this step's output
    return Predictions(logits, ids, values, features if draft.version == 1 else [])


PPD_ANCHORS = 32  # anchors per window whose prompt tokens one training forward runs


def ppd_anchors(T: int, m: int, count: int = PPD_ANCHORS) -> torch.Tensor:
    """[A] window positions t (spread evenly) whose prompt k can be scored against position t+k <= T-1."""
    last = T - 1 - m
    if last < 0:
        raise ValueError(f"windows of {T} tokens are too short for {m} prompt tokens")
    return torch.linspace(0, last, min(count, last + 1)).round().long().unique()


def ppd_inputs(T: int, anchors: torch.Tensor, m: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [1, T + A·m] and the additive mask [1, 1, T+A·m, T+A·m] of a window followed by m chained
    prompt tokens per anchor: the window causal, prompt k of anchor t at position t+k seeing tokens 0..t and
    its anchor's prompts 1..k (the tree verification's layout, all anchors in one forward)."""
    A = anchors.shape[0]
    n = T + A * m
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:T, :T] = torch.ones(T, T, dtype=torch.bool).tril()
    rows = T + torch.arange(A * m)  # [A·m] prompt rows, anchor-major
    anchor_of = anchors.repeat_interleave(m)  # [A·m]
    k = torch.arange(m).repeat(A)  # [A·m] 0-based prompt index
    allowed[rows] = torch.arange(n)[None, :] <= anchor_of[:, None]  # tokens 0..t (the prompt block stays False)
    block = torch.ones(m, m, dtype=torch.bool).tril()  # prompts 1..k of the same anchor
    for a in range(A):
        allowed[T + a * m: T + (a + 1) * m, T + a * m: T + (a + 1) * m] = block
    positions = torch.cat([torch.arange(T), anchor_of + k + 1])[None]  # [1, T + A·m]
    return positions, additive_mask(allowed, 0, dtype)


def ppd_predictions(prompts: PromptTokens, model, data: dict[str, torch.Tensor], windows: torch.Tensor) -> Predictions:
    """The frozen target over each window with the prompt tokens after every anchor; prompt k's logits at anchor
    t against the target's own distribution at t+k (its next-next-... token given the true text)."""
    def extras(embeds: torch.Tensor, anchors: int) -> torch.Tensor:  # [B, T, d] -> [B, A·m, d] the prompts, per anchor
        return prompts.embeddings.to(embeds.device, embeds.dtype).repeat(anchors, 1).expand(embeds.shape[0], -1, -1)
    return positions_ahead_predictions(model, data, windows, prompts.n_heads, extras)


def positions_ahead_predictions(model, data: dict[str, torch.Tensor], windows: torch.Tensor, m: int,
                                extras: Callable[[torch.Tensor, int], torch.Tensor],
                                around: Callable[[torch.Tensor], contextlib.AbstractContextManager] | None = None
                                ) -> Predictions:
    """The frozen target over each window with m extra positions after each of A anchors (PPD's layout); extra k's
    logits at anchor t against the target's own distribution at t+k. `extras(embeds [B, T, d], A)`: the extras'
    [B, A·m, d] input embeddings; `around(anchors)`: a context the forward runs in (Hidden Transfer's hook)."""
    tokens = data["tokens"][windows].long()  # [B, T]
    top_ids, top_logits = data["top_ids"][windows], data["top_logits"][windows]
    B, T = tokens.shape
    anchors = ppd_anchors(T, m)
    A = anchors.shape[0]
    device, dtype = model.device, model.dtype
    positions, mask = ppd_inputs(T, anchors, m, dtype)
    embeds = model.get_input_embeddings()(tokens.to(device))  # [B, T, d]
    with around(anchors) if around is not None else contextlib.nullcontext():
        out = model.model(inputs_embeds=torch.cat([embeds, extras(embeds, A)], dim=1), attention_mask=mask.to(device),
                          position_ids=positions.expand(B, -1).to(device), use_cache=False)
    logits = model.lm_head(out.last_hidden_state[:, T:]).float().view(B, A, m, -1).cpu()  # [B, A, m, V]
    scored = [anchors + k for k in range(1, m + 1)]  # extra k at anchor t: the target's distribution at t+k
    return Predictions([logits[:, :, k] for k in range(m)], [top_ids[:, i] for i in scored],
                       [top_logits[:, i] for i in scored], [])


@contextlib.contextmanager
def frozen_weights(model) -> Iterator[None]:
    """The target's parameters out of autograd while prompt tokens train through it; restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def frozen_or_own(draft: EagleDraft, frozen: Frozen, hidden: torch.Tensor) -> torch.Tensor:
    """EAGLE reads out through the target's LM head; EAGLE-3 through its own (the same rows, kept in the heads)."""
    return draft.lm_head(hidden) if draft.version == 3 else frozen.logits(hidden)


def _ttt_allowed(true_entries: int, chains: int, step: int) -> torch.Tensor:
    """[C, true + (step-1)·C] bool: chain j sees true entries 0..j and its own entry of each step 2..step."""
    rows = torch.arange(chains)[:, None]
    true_part = torch.arange(true_entries)[None, :] <= rows  # [C, true]
    own = [torch.eye(chains, dtype=torch.bool) for _ in range(step - 1)]  # one diagonal block per later step
    return torch.cat([true_part, *own], dim=1)


def prediction_loss(pred: Predictions, vocab: DraftVocab) -> torch.Tensor:
    total = torch.zeros(())
    for k, (logits, ids, values) in enumerate(zip(pred.logits, pred.top_ids, pred.top_logits)):
        weight = POSITION_DECAY**k
        scale = DISTRIBUTION_WEIGHT if pred.features else 1.0
        total = total + weight * scale * distribution_loss(logits, ids, values, vocab)
        if pred.features:
            predicted, true = pred.features[k]
            total = total + weight * FEATURE_WEIGHT * F.smooth_l1_loss(predicted, true)
    return total


@torch.no_grad()
def agreement(predict: Callable[[torch.Tensor], Predictions], n_windows: int, vocab: DraftVocab, topk: int,
              batch: int = 8) -> dict:
    """Per head position k: how often the heads' best (top-1) and k best (top-k) contain the target's argmax,
    over every position of `n_windows` held-out windows (teacher-forced)."""
    hits1: list[float] = []
    hitsk: list[float] = []
    by_rank: list[list[float]] = []  # k -> hits at each rank r < topk (the per-position, per-rank acceptance a tree reads)
    count: list[int] = []
    for windows in torch.arange(n_windows).split(batch):
        pred = predict(windows)
        for k, (logits, ids) in enumerate(zip(pred.logits, pred.top_ids)):
            best = vocab.index_of(ids[..., 0].long())  # [B, n] the target's argmax in draft-vocab positions (-1: none)
            ranked = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices  # [B, n, topk]
            if len(hits1) <= k:
                hits1.append(0.0), hitsk.append(0.0), count.append(0), by_rank.append([0.0] * ranked.shape[-1])
            hit = ranked == best[..., None]  # [B, n, topk]
            hits1[k] += float(hit[..., 0].sum())
            hitsk[k] += float(hit.any(dim=-1).sum())
            by_rank[k] = [h + float(c) for h, c in zip(by_rank[k], hit.flatten(0, -2).sum(0))]
            count[k] += best.numel()
    return {"top1": [round(h / n, 4) for h, n in zip(hits1, count)],
            "topk": [round(h / n, 4) for h, n in zip(hitsk, count)], "k": topk, "positions": count,
            "by_rank": [[round(h / n, 4) for h in row] for row, n in zip(by_rank, count)]}
