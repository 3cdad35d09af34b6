"""PEARL: chains, reuse of the post-verify lookahead, pre-verify cuts, thread hygiene, and losslessness
with the background threads on (greedy token for token, sampling by chi-square)."""

import itertools
import threading
import time

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from spectune.engine.loop import Decoder
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling, probabilities
from spectune.methods import METHODS
from spectune.methods.base import Models
from spectune.methods.pearl import Chain, chain_tree, draft_chain, full_acceptance
from support import random_llama

MIN_P = 1e-3


@pytest.fixture(scope="module")
def models16():
    return random_llama(seed=1, vocab=16, layers=2, hidden=32), random_llama(seed=2, vocab=16, layers=1, hidden=32)


class Guard:
    """Wraps a CausalLM's forward: counts calls that overlap another call on the same cache, and can slow it."""

    def __init__(self, lm: CausalLM, delay_s: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.overlaps = 0
        self.threads: set[str] = set()
        original = lm.forward

        def forward(*args, **kwargs):
            if not self.lock.acquire(blocking=False):
                self.overlaps += 1
                return original(*args, **kwargs)
            try:
                self.threads.add(threading.current_thread().name)
                time.sleep(delay_s)
                return original(*args, **kwargs)
            finally:
                self.lock.release()

        lm.forward = forward


# --- pure pieces ------------------------------------------------------------------------------


def test_draft_chain_is_the_drafters_greedy_continuation_and_leaves_the_cache_consistent(models16):
    _, drafter = models16
    lm = CausalLM(drafter)
    chain = draft_chain(lm, [1, 2, 3], 4, Sampling(), None)
    assert len(chain.tokens) == 4 and chain.calls == 4 and chain.q_rows == ()
    assert lm.cache.tokens == (1, 2, 3, *chain.tokens[:-1])  # the last token is never fed
    sequence = [1, 2, 3]
    for token in chain.tokens:  # plain argmax decoding with a fresh cache gives the same tokens
        assert int(CausalLM(drafter).forward(sequence)[-1].argmax()) == token
        sequence.append(token)
    stops = iter([False, True])
    short = draft_chain(CausalLM(drafter), [1, 2, 3], 4, Sampling(), None, lambda: next(stops))
    assert short.tokens == chain.tokens[:2]


def test_chain_tree_cuts_and_stacks_q():
    q_rows = tuple(torch.full((5,), 0.2) for _ in range(3))
    tree = chain_tree(9, Chain((1, 2, 3), q_rows, calls=3), limit=2)
    assert tree.tokens == (9, 1, 2) and tree.parents == (-1, 0, 1) and tree.draft_calls == 3
    assert tree.q.shape == (3, 5) and tree.q[2].sum() == 0  # the leaf's children were never drawn
    assert chain_tree(9, Chain((1,), (), 1), limit=4).q is None


def test_full_acceptance_means_the_whole_chain_plus_one_bonus():
    base = (1, 2, 3, 4)
    assert full_acceptance([1, 2, 3, 4, 7], base)
    assert not full_acceptance([1, 2, 3, 7], base)  # 4 rejected
    assert not full_acceptance([1, 2, 3, 4, 7, 8], base)


# --- greedy: equal to AR whatever the threads do -----------------------------------------------


def ar_tokens(target, prompt, n):
    return Decoder(CausalLM(target), METHODS.build("ar", {}, Models(CausalLM(target), None))).generate(prompt, n).tokens


@pytest.mark.parametrize(
    "knobs",
    [{}, {"gamma": 1}, {"gamma": 6, "pre_verify": False}, {"post_verify": False}, {"parallel": False}, {"target_threads": 2}],
)
def test_greedy_equals_ar_with_a_different_drafter(models16, knobs):
    target, drafter = models16
    models = Models(CausalLM(target), CausalLM(drafter))
    pearl = METHODS.build("pearl", knobs, models)
    guards = [Guard(lm) for lm in (models.drafter, pearl.lookahead_lm, pearl.verifier) if lm is not None]
    decoder = Decoder(models.target, pearl)
    for prompt in ([1, 2, 3], [4, 4, 4, 4, 4], [7]):
        assert decoder.generate(prompt, 30).tokens == ar_tokens(target, prompt, 30), knobs
    assert all(g.overlaps == 0 for g in guards), "two threads used one KV cache at once"


def test_a_drafter_equal_to_the_target_reuses_every_lookahead(models16):
    target, _ = models16
    models = Models(CausalLM(target), CausalLM(target))  # the drafter's guesses are always right
    pearl = METHODS.build("pearl", {"gamma": 3}, models)
    foreground, lookahead = Guard(models.drafter), Guard(pearl.lookahead_lm)
    generation = Decoder(models.target, pearl).generate([1, 2, 3], 41)
    assert generation.tokens == ar_tokens(target, [1, 2, 3], 41)
    assert [s.accepted for s in generation.steps] == [3] * 10 + [0]  # every chain accepted; the last one cut
    # PEARL drafts ahead in post-verify mode, i.e. from the second step on; each lookahead is used next step
    assert pearl.stats["lookaheads"] == 9 and pearl.stats["reused"] == 8
    assert foreground.threads == {"MainThread"}  # one user per cache
    assert lookahead.threads and all(t.startswith("pearl-drafter") for t in lookahead.threads)
    assert foreground.overlaps == lookahead.overlaps == 0


def test_pre_verify_cuts_a_chain_whose_first_token_the_target_rejects(models16):
    target, drafter = models16
    models = Models(CausalLM(target), CausalLM(drafter))
    pearl = METHODS.build("pearl", {"gamma": 8, "post_verify": False}, models)
    Guard(models.drafter, delay_s=0.01)  # a slow drafter: the target's answer arrives mid-chain
    generation = Decoder(models.target, pearl).generate([1, 2, 3], 30)
    assert generation.tokens == ar_tokens(target, [1, 2, 3], 30)
    assert pearl.stats["preverify_cuts"] > 0
    cut_steps = [s for s in generation.steps if s.drafted == 1 and s.accepted == 0]
    assert cut_steps, "a cut chain is one token long"


def test_thread_counts_are_restored_and_errors_surface(models16):
    target, drafter = models16
    before = torch.get_num_threads()
    models = Models(CausalLM(target), CausalLM(drafter))
    pearl = METHODS.build("pearl", {"target_threads": before + 1}, models)
    Decoder(models.target, pearl).generate([1, 2, 3], 20)
    assert torch.get_num_threads() == before

    def broken(*args, **kwargs):
        raise RuntimeError("drafter failed in the background")

    models = Models(CausalLM(target), CausalLM(target))  # every chain accepted: the lookahead always runs
    pearl = METHODS.build("pearl", {"target_threads": before + 1}, models)
    pearl.lookahead_lm.forward = broken
    with pytest.raises(RuntimeError, match="drafter failed in the background"):
        Decoder(models.target, pearl).generate([1, 2, 3], 20)
    assert torch.get_num_threads() == before


def test_the_target_verifies_with_target_threads_while_a_lookahead_drafts_beside_it(models16):
    target, _ = models16
    before = torch.get_num_threads()
    models = Models(CausalLM(target), CausalLM(target))  # every chain accepted: post-verify mode from step 2
    pearl = METHODS.build("pearl", {"gamma": 3, "target_threads": before + 1, "pre_verify": False}, models)
    Guard(pearl.lookahead_lm, delay_s=0.05)  # a slow lookahead: still drafting when the target verifies
    seen, verify = [], models.target.verify

    def counting_verify(*args, **kwargs):
        seen.append(torch.get_num_threads())
        if len(seen) == 6:
            raise RuntimeError("verification failed")
        return verify(*args, **kwargs)

    models.target.verify = counting_verify
    with pytest.raises(RuntimeError, match="verification failed"):
        Decoder(models.target, pearl).generate([1, 2, 3], 30)
    assert torch.get_num_threads() == before  # restored on the way out of a failing verification too
    assert seen[0] == before  # step 1 is in pre-verify mode: no lookahead, the thread count stays
    assert seen[1:] == [before + 1] * 5  # then each verification runs beside that step's lookahead
    pearl.reset()


def test_knob_errors_name_the_field():
    with pytest.raises(ValueError, match="pearl.*gamma"):
        METHODS.knobs("pearl", {"gamma": 0})
    with pytest.raises(ValueError, match="drafter_threads"):
        METHODS.knobs("pearl", {"drafter_threads": 0})
    with pytest.raises(ValueError, match="drafts with a drafter model"):
        METHODS.build("pearl", {}, Models(CausalLM(random_llama(0)), None))


# --- sampling: the emitted tokens follow the target's law, reuse and pre-verify included ----------


def exact_law(target, prompt, sampling, length):
    """{token tuple: probability} of the first `length` tokens the target samples after `prompt`."""
    law = {(): 1.0}
    for _ in range(length):
        law = {
            prefix + (t,): mass * float(p[t])
            for prefix, mass in law.items()
            for p in [probabilities(CausalLM(target).forward(prompt + list(prefix))[-1], sampling)]
            for t in range(p.shape[-1])
        }
    return law


@pytest.mark.parametrize("same_drafter", [True, False], ids=["reuse", "pre-verify"])
def test_sampled_tokens_follow_the_target(same_drafter):
    target = random_llama(seed=3, vocab=4, layers=2, hidden=32)
    drafter = target if same_drafter else random_llama(seed=4, vocab=4, layers=1, hidden=32)
    models = Models(CausalLM(target), CausalLM(drafter))
    # reuse: gamma 1 and 6 tokens = three steps; the second drafts ahead (post-verify mode) and the third
    # reuses that lookahead when the bonus was guessed. pre-verify: gamma 2 pre-verifies the first chain,
    # and a slightly slow drafter lets the target's answer arrive in time to cut it.
    pearl = METHODS.build("pearl", {"gamma": 1 if same_drafter else 2}, models)
    if not same_drafter:
        Guard(models.drafter, delay_s=0.001)
    length = 6 if same_drafter else 4
    decoder = Decoder(models.target, pearl)
    sampling = Sampling(temperature=1.0)
    prompt = [1, 2, 3]
    law = exact_law(target, prompt, sampling, length)
    n = 500
    first, last = np.zeros(16), np.zeros(16)
    for seed in range(n):
        tokens = decoder.generate(prompt, length, sampling, seed=seed).tokens
        first[tokens[0] * 4 + tokens[1]] += 1
        last[tokens[-2] * 4 + tokens[-1]] += 1
    exercised = pearl.stats["reused" if same_drafter else "preverify_cuts"]
    assert exercised > n / 10, f"only {exercised} of {n} generations took the path under test"
    for counts, pick in ((first, lambda k: k[0] * 4 + k[1]), (last, lambda k: k[-2] * 4 + k[-1])):
        expected = np.zeros(16)
        for key, mass in law.items():
            expected[pick(key)] += mass
        keep = expected > 0
        assert counts[~keep].sum() == 0
        _, p_value = chisquare(counts[keep], expected[keep] / expected[keep].sum() * n)
        assert p_value > MIN_P, f"chi-square p={p_value:.2g}"
