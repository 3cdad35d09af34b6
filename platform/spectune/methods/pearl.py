"""`pearl`: PEARL (Liu et al. 2024), drafter and target working at the same time, adaptive draft length.

Plain SpS makes each model wait for the other: the target idles while the drafter drafts
gamma tokens, the drafter idles while the target verifies them. PEARL overlaps the two:

- post-verify (after a fully accepted chain): while the loop's target verifies the chain
  d1..dg, a background thread keeps drafting as if the whole chain will be accepted: it
  guesses the target's bonus token (the drafter's argmax after dg) and drafts gamma more
  tokens after the guess. If the target accepts the whole chain and its bonus equals the
  guess, the next step's chain is already there (drafted while the target worked); otherwise
  the lookahead is stopped and dropped.
- pre-verify: after a rejection (when the next chain is drafted from scratch) a second
  thread runs the target on the root while the drafter drafts; if the target would reject
  the first draft token, drafting stops at once instead of finishing a doomed chain.

The modes switch as in the paper: a fully accepted chain puts the next step in post-verify
mode, a rejection puts it in pre-verify mode.

Lossless by construction: the loop verifies whatever chain this returns with its own target
forward. Reused tokens were drawn from the drafter given exactly the committed sequence
(the reuse test checks it), independently of the target's randomness, so sampling stays
exact.

No cache is shared between threads: the foreground drafts with the drafter's runner, the
lookahead thread with its own runner over the same weights, pre-verify with its own target
runner (never the loop's). Each worker runs its jobs one at a time, so its cache has one user.
Hence a missed lookahead is just told to stop; the foreground never waits for it.

Each side's torch thread count is set per thread (OpenMP/MKL settings are per thread), and the
loop's thread is switched to `target_threads` only for the target's verification while a
lookahead drafts beside it (`verifying`, which the loop enters around that forward), then
restored, so nothing leaks into other methods timed in the same process.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from pydantic import Field

from spectune.engine.drafter import DraftContext, StepOutcome
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling, probabilities, sample
from spectune.trees.draft import DraftTree
from spectune.methods.base import Knobs, Models
from spectune.methods.draft_cache import ModelDrafter
from spectune.methods.growing import GrowingTree
from spectune.methods.registry import METHODS

#: pre-verify stops drafting when the target would accept the first draft token with a
#: probability below this (greedy: the target's argmax differs, probability 0).
PREVERIFY_CUT = 0.5


class PearlKnobs(Knobs):
    gamma: int = Field(4, ge=1, le=32, description="draft tokens per step (PEARL's gamma; also what post-verify drafts ahead)")
    parallel: bool = Field(True, description="draft beside the target in threads; off = plain SpS with draft_len=gamma")
    pre_verify: bool = Field(True, description="after a rejection, check the first draft token with the target while drafting")
    post_verify: bool = Field(True, description="while the target verifies, draft the continuation that full acceptance needs")
    drafter_threads: int = Field(1, ge=1, le=256, description="torch threads of the drafter while it runs beside the target")
    target_threads: int = Field(1, ge=1, le=256, description="torch threads of the target while the drafter runs beside it")

    def tree_knobs(self) -> str:
        return f"gamma={self.gamma}"


@dataclass(frozen=True)
class Chain:
    """Draft tokens and, when sampling, the distribution each was drawn from."""

    tokens: tuple[int, ...]
    q_rows: tuple[torch.Tensor, ...]  # empty when greedy
    calls: int  # drafter forward passes spent


def pick(logits: torch.Tensor, sampling: Sampling, rng: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
    """One draft token from [V] drafter logits: argmax when greedy, else a draw from q (returned too)."""
    if sampling.greedy:
        return int(logits.argmax()), None
    q = probabilities(logits, sampling)  # [V]
    return sample(q, rng), q


def draft_chain(
    lm: CausalLM,
    sequence: Sequence[int],
    length: int,
    sampling: Sampling,
    rng: torch.Generator | None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Chain:
    """Up to `length` (>= 1) tokens after `sequence`; stops early when should_stop() turns true.

    Afterwards the cache holds `sequence` plus every chain token but the last (never fed).
    """
    logits = lm.extend_to(sequence)  # [V]
    tokens, q_rows, calls = [], [], 1
    while True:
        token, q = pick(logits, sampling, rng)
        tokens.append(token)
        if q is not None:
            q_rows.append(q)
        if len(tokens) >= length or should_stop():
            return Chain(tuple(tokens), tuple(q_rows), calls)
        logits = lm.forward([token], last_only=True)[-1]  # [V]
        calls += 1


def chain_tree(root: int, chain: Chain, limit: int) -> DraftTree:
    """A chain as a draft tree, cut to `limit` tokens; q row i = the law node i's child was drawn from."""
    tree = GrowingTree(root)
    for node, token in enumerate(chain.tokens[:limit]):
        if chain.q_rows:
            tree.q_rows[node] = chain.q_rows[node]  # [V]
        tree.add(token, node)
    return tree.draft_tree(chain.calls)


def full_acceptance(sequence: Sequence[int], base: tuple[int, ...]) -> bool:
    """The loop accepted every token of the chain ending `base`: sequence = base + one bonus token."""
    return len(sequence) == len(base) + 1 and tuple(sequence[: len(base)]) == base


@dataclass
class Lookahead:
    """A post-verify job: drafting after `base` (= sequence + chain) in the background."""

    base: tuple[int, ...]
    stop: threading.Event = field(default_factory=threading.Event)
    guessed: threading.Event = field(default_factory=threading.Event)
    guess: int | None = None  # the drafter's guess of the target's bonus token
    future: Future | None = None  # -> Chain drafted after base + (guess,)


@dataclass
class PreVerify:
    """A pre-verify job: the target's acceptance probability of the first draft token."""

    future: Future  # -> float

    def rejects(self) -> bool:
        return self.future.done() and self.future.result() < PREVERIFY_CUT


class ThreadCount:
    """Switch the calling thread's torch thread count and put it back (a no-op when unchanged)."""

    def __init__(self) -> None:
        self._saved: int | None = None

    def use(self, threads: int) -> None:
        if self._saved is None:
            self._saved = torch.get_num_threads()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def restore(self) -> None:
        if self._saved is not None and torch.get_num_threads() != self._saved:
            torch.set_num_threads(self._saved)
        self._saved = None


class PearlDrafter(ModelDrafter):
    def __init__(self, models: Models, knobs: PearlKnobs) -> None:
        super().__init__(models.drafter)  # the foreground's drafter cache
        self.knobs = knobs
        self.max_tree_size = knobs.gamma
        post, pre = knobs.parallel and knobs.post_verify, knobs.parallel and knobs.pre_verify
        # every thread gets its own runner (own KV cache) over the shared weights
        self.lookahead_lm = CausalLM(models.drafter.model) if post else None
        self.verifier = CausalLM(models.target.model) if pre else None  # never the loop's target cache
        self._drafter_worker = self._worker("pearl-drafter", knobs.drafter_threads) if post else None
        self._target_worker = self._worker("pearl-preverify", knobs.target_threads) if pre else None
        self._threads = ThreadCount()
        self._ahead: Lookahead | None = None  # the lookahead drafting beside this step's verification
        self._ready: tuple[tuple[int, ...], Lookahead] | None = None  # (sequence it may continue, job)
        self._preverify: PreVerify | None = None
        self._outstanding: list[Future] = []  # background jobs nobody waits for: errors surface from here
        self._mode = "pre"  # PEARL starts in pre-verify mode
        self.stats = {"lookaheads": 0, "reused": 0, "preverifies": 0, "preverify_cuts": 0}

    def _worker(self, name: str, threads: int) -> ThreadPoolExecutor:
        pool = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(threads,))
        weakref.finalize(self, pool.shutdown, wait=False)
        return pool

    # --- the Drafter protocol -----------------------------------------------------------------

    def reset(self) -> None:
        self._stop_lookaheads()
        for job in self._outstanding:  # at most one pass each; a new prompt starts with idle workers
            job.result()
        self._outstanding = []
        for lm in (self.lm, self.lookahead_lm, self.verifier):
            if lm is not None:
                lm.reset()
        self._mode = "pre"

    def draft(self, context: DraftContext) -> DraftTree:
        sequence, sampling = context.sequence, context.sampling
        limit = min(self.knobs.gamma, context.max_depth)
        reused = self._take_ready(sequence) if limit else None
        if limit == 0:
            return DraftTree.root_only(sequence[-1])
        if reused is not None:
            chain = reused
            self.stats["reused"] += 1
        elif self._preverify_applies(limit):
            chain = self._draft_with_preverify(sequence, limit, sampling, context.rng)
        else:
            chain = draft_chain(self.lm, sequence, limit, sampling, context.rng)
        tree = chain_tree(sequence[-1], chain, limit)
        if self._post_verify_applies(context, tree):
            self._launch_ahead(sequence + tree.tokens[1:], sampling, context.rng)
        return tree

    @contextlib.contextmanager
    def verifying(self, tree: DraftTree) -> Iterator[None]:
        """The target verifies with `target_threads` while this step's lookahead drafts beside it."""
        if self._ahead is not None and not self._ahead.future.done():
            self._threads.use(self.knobs.target_threads)
        try:
            yield
        finally:
            self._threads.restore()

    def commit(self, sequence: Sequence[int]) -> None:
        self._reap()
        job, self._ahead = self._ahead, None
        if job is not None:
            if full_acceptance(sequence, job.base):
                self._ready = (tuple(sequence), job)  # draft() checks the guess, then waits for the chain
            else:
                job.stop.set()  # drafted for a future that did not happen; nobody waits for it
        super().commit(sequence)

    def observe(self, outcome: StepOutcome) -> None:
        if outcome.tree.size:
            self._mode = "post" if outcome.verdict.accepted == outcome.tree.size else "pre"

    # --- post-verify --------------------------------------------------------------------------

    def _post_verify_applies(self, context: DraftContext, tree: DraftTree) -> bool:
        """PEARL drafts ahead in post-verify mode: after a fully accepted chain, when full acceptance is likely."""
        more_after_this_step = context.max_depth > tree.size  # else the loop stops at this step's bonus
        return self._drafter_worker is not None and self._mode == "post" and more_after_this_step

    def _launch_ahead(self, base: tuple[int, ...], sampling: Sampling, rng: torch.Generator) -> None:
        # the background draws from its own generator (seeded here, in order) so the loop's rng is never shared
        seed = None if sampling.greedy else int(torch.randint(0, 2**62, (1,), generator=rng))
        job = Lookahead(base)
        job.future = self._drafter_worker.submit(self._run_ahead, job, sampling, seed)
        self.stats["lookaheads"] += 1
        self._outstanding.append(job.future)
        self._ahead = job  # the loop's verification runs next, beside it (see `verifying`)

    def _run_ahead(self, job: Lookahead, sampling: Sampling, seed: int | None) -> Chain:
        """Background thread: guess the bonus token, then draft gamma tokens after it."""
        try:
            if job.stop.is_set():  # stopped while queued behind an earlier job
                return Chain((), (), 0)
            logits = self.lookahead_lm.extend_to(job.base)  # [V] after the chain's last token
            job.guess = int(logits.argmax())  # the target's most likely bonus, as the drafter sees it
        finally:
            job.guessed.set()  # never leave the foreground waiting, even on an error
        if job.stop.is_set():
            return Chain((), (), 1)
        rng = None if seed is None else torch.Generator().manual_seed(seed)
        chain = draft_chain(self.lookahead_lm, job.base + (job.guess,), self.knobs.gamma, sampling, rng, job.stop.is_set)
        return Chain(chain.tokens, chain.q_rows, chain.calls + 1)

    def _take_ready(self, sequence: tuple[int, ...]) -> Chain | None:
        """The lookahead's chain if its guess of the bonus came true (then wait for all gamma tokens)."""
        ready, self._ready = self._ready, None
        if ready is None:
            return None
        continues, job = ready
        job.guessed.wait()
        if continues != sequence or job.guess != sequence[-1]:
            job.stop.set()
            return None
        chain = job.future.result()  # the lookahead's remaining passes (re-raises a background error)
        return chain if len(chain.tokens) == self.knobs.gamma else None

    def _stop_lookaheads(self) -> None:
        for job in (self._ahead, self._ready[1] if self._ready else None):
            if job is not None:
                job.stop.set()
        self._ahead, self._ready = None, None

    def _reap(self) -> None:
        """Forget finished background jobs, re-raising the first error one of them hit."""
        running = []
        for job in self._outstanding:
            if not job.done():
                running.append(job)
            elif job.exception() is not None:
                self._stop_lookaheads()
                raise job.exception()
        self._outstanding = running

    # --- pre-verify ---------------------------------------------------------------------------

    def _preverify_applies(self, limit: int) -> bool:
        idle = self._preverify is None or self._preverify.future.done()  # never queue behind a late answer
        return self._target_worker is not None and self._mode == "pre" and limit >= 2 and idle

    def _draft_with_preverify(
        self, sequence: tuple[int, ...], limit: int, sampling: Sampling, rng: torch.Generator
    ) -> Chain:
        first = draft_chain(self.lm, sequence, 1, sampling, rng)
        q_first = first.q_rows[0] if first.q_rows else None
        job = PreVerify(self._target_worker.submit(self._acceptance, sequence, first.tokens[0], q_first, sampling))
        self.stats["preverifies"] += 1
        self._preverify = job
        self._outstanding.append(job.future)
        self._threads.use(self.knobs.drafter_threads)  # the drafter now runs beside the target
        try:
            if job.rejects():
                rest = Chain((), (), 0)
            else:
                rest = draft_chain(self.lm, sequence + first.tokens, limit - 1, sampling, rng, job.rejects)
        finally:
            self._threads.restore()
        if job.rejects():  # the target has spoken: the chain after a rejected first token is wasted
            self.stats["preverify_cuts"] += 1
            rest = Chain((), (), rest.calls)
        return Chain(first.tokens + rest.tokens, first.q_rows + rest.q_rows, first.calls + rest.calls)

    def _acceptance(self, sequence: tuple[int, ...], token: int, q: torch.Tensor | None, sampling: Sampling) -> float:
        """Target thread: the chance the loop accepts `token` after `sequence` (greedy: 0 or 1)."""
        logits = self.verifier.extend_to(sequence)  # [V]
        if sampling.greedy:
            return float(int(logits.argmax()) == token)
        return min(1.0, float(probabilities(logits, sampling)[token] / q[token]))


@METHODS.register(
    "pearl",
    PearlKnobs,
    needs_drafter=True,
    hybrid=(
        "its verifier re-extends the target's cache from an older prefix, further back than a hybrid's SSM "
        "state rolls"
    ),
    summary="PEARL: drafter and target in parallel threads; post-verify drafts the next chain while the target "
    "verifies, pre-verify checks the first draft token while the rest is drafted",
    paper="Liu et al. 2024, PEARL: Parallel Speculative Decoding with Adaptive Draft Length",
    cost="gamma drafter passes per step, those of a reused chain overlapped with the target; pre-verify adds a "
    "target pass over the new tokens beside the drafter; gamma + 1 tokens verified",
    rule="greedy match; rejection sampling min(1, p/q), residual norm(max(p-q, 0)) (the loop verifies every chain)",
    columns={"draft_len": ("gamma",)},
)
def build_pearl(knobs: PearlKnobs, models: Models) -> PearlDrafter:
    return PearlDrafter(models, knobs)
