"""Lossless sampling with trained heads: the tokens medusa, hydra, eagle, eagle3, falcon, ppd and hidden-transfer emit
follow the target's law.

A random 4-layer target over a 4-token vocabulary; heads trained (in seconds) on its own samples, so
they agree with it often and the first step accepts 3 drafted tokens in a fair share of runs; then a
chi-square test of the first four emitted tokens (256 cells, the rare ones pooled) against the exact
law computed from the target by enumeration. Depth 3 is drafted and accepted: recursive rejection over
sibling sets below the root is exercised, not only the first level. The methods come from the registry
(every one that `needs_heads`), and the wrong-q mutant (a drafter recording its parent's q on every
non-root node) fails the same test for each: it has power.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.stats import chisquare

from spectune.engine.loop import Decoder
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling
from spectune.heads.build import options_for, train_from_features
from spectune.heads.features import FeatureSpec, Features, feature_pass, fused_layers
from spectune.methods import METHODS
from spectune.methods.base import Models
from support import random_llama
from dataclasses import replace

from test_sampling_lossless import WrongQ

V = 4
PROMPT = [1, 2, 3, 1, 2]
NEW = 4  # the first step may draft (and accept) depth 3, the bonus is the 4th token
SAMPLES = 1200
# the wrong-q mutant shifts only the cells a deep acceptance fills: at 1200 samples medusa's, hydra's and
# eagle's mutants read p = 0.0075, 0.0034 and 0.0013, above MIN_P; three times as many make each clear
MUTANT_SAMPLES = 3 * SAMPLES
MIN_P = 1e-3


@pytest.fixture(scope="module")
def target():
    return random_llama(seed=11, vocab=V, layers=4, hidden=32)


def own_samples(model, n: int, length: int, seed: int) -> torch.Tensor:
    """[n, length] sequences sampled from the model at temperature 1 (its own text to train the heads on)."""
    torch.manual_seed(seed)
    start = torch.randint(V, (n, 1))
    out = model.generate(input_ids=start, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=length - 1,
                         min_new_tokens=length - 1, pad_token_id=0, attention_mask=torch.ones_like(start))
    return out.to(torch.int32)


@pytest.fixture(scope="module")
def heads(target, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("heads")
    spec = FeatureSpec(seq_len=64, topk=V, batch=16)
    fused = fused_layers(4)
    split = {}
    for name, count, seed in (("train", 96, 1), ("heldout", 8, 2)):
        tensors = feature_pass(target, own_samples(target, count, spec.seq_len, seed), spec, fused, name, progress=False)
        save_file(tensors, str(folder / f"{name}.safetensors"))
        split[name] = Features(folder / f"{name}.safetensors", 4, fused)
    for kind in sorted({METHODS.get(name).needs_heads for name in HEADS_METHODS}):
        (folder / kind).mkdir()
        options = options_for(kind, n_heads=HEADS_SIZE.get(kind, 3), steps=150, batch=8, lr=3e-3)
        train_from_features(target, options, split["train"], split["heldout"], folder / kind, {}, progress=False)
    return folder


def exact_law(target) -> np.ndarray:
    """P(first four new tokens) by enumeration: 1 + 4 + 16 + 64 forwards, batched per depth."""
    law = np.ones(1)
    prefixes = [[]]
    with torch.no_grad():
        for _ in range(NEW):
            batch = torch.tensor([PROMPT + p for p in prefixes])
            probs = torch.softmax(target(input_ids=batch).logits[:, -1].float(), dim=-1).numpy()  # [m, V]
            law = (law[:, None] * probs).reshape(-1)
            prefixes = [p + [t] for p in prefixes for t in range(V)]
    return law


HEADS_METHODS = [name for name in METHODS.names() if METHODS.get(name).needs_heads]  # the registry's, not a list here
# depth-3 trees small enough for a 4-token vocabulary (a method not named here runs with its defaults)
KNOBS = {
    "medusa": {"branching": [2, 2, 2]},
    "hydra": {"branching": [2, 1, 1]},
    "eagle": {"budget": 8, "max_depth": 3, "topk": 2},
    "eagle3": {"budget": 6, "max_depth": 3, "topk": 2, "per_pass": 2},
    "falcon": {"branching": [3, 2, 1]},  # blocks of 2: depth 3 is the second pass's, drafted from the first's output
    "ppd": {"budget": 8},  # the best 8 rank paths of its card: 3 deep on this target
    "hidden-transfer": {"budget": 8},  # likewise, from its pseudo positions' card
    "rasd-eagle3": {"draft_nodes": 6, "draft_depth": 3, "draft_topk": 2, "budget": 9, "retrieval_depth": 3},
}
HEADS_SIZE = {"falcon": 2}  # n_heads where not 3: falcon's block
CONFIGS = [(name, KNOBS.get(name, {})) for name in HEADS_METHODS]


class SharpenedQ(WrongQ):
    """The wrong-temperature mutant: every q row squared and renormalised, so the verifier reads a q the
    draws did not come from, at every depth (the root's children too)."""

    def draft(self, context):
        tree = self.inner.draft(context)
        if tree.q is None:
            return tree
        q = tree.q**2  # [n+1, V]
        self.altered += len(tree.parents)
        return replace(tree, q=q / q.sum(dim=-1, keepdim=True).clamp(min=1e-12))


# ppd's prompt k predicts the token k ahead, and on this random target the law k ahead is near its stationary
# one for every k >= 2 (measured: the three prompts' q at the prompt differ by < 0.03 per token), so the
# parent's-q mutant hands the verifier almost the right q (p = 0.84 at 600 samples): it has no power there.
# The wrong-temperature mutant does, at every depth.
MUTANTS = {"ppd": SharpenedQ, "hidden-transfer": SharpenedQ}  # hidden-transfer's pseudo position k: the same law k ahead


def first_tokens(target, heads, method, knobs, mutant=False, samples=SAMPLES) -> tuple[np.ndarray, int]:
    """Counts of the first NEW tokens over `samples` samples ([V**NEW]) and how many first steps accepted depth 3."""
    models = Models(CausalLM(target), None)
    drafter = METHODS.build(method, {**knobs, "heads": str(heads / METHODS.get(method).needs_heads)}, models)
    decoder = Decoder(models.target, MUTANTS.get(method, WrongQ)(drafter) if mutant else drafter)
    sampling = Sampling(temperature=1.0)
    counts = np.zeros(V**NEW)
    deep = 0
    for seed in range(samples):
        generation = decoder.generate(PROMPT, NEW, sampling, seed=seed)
        a, b, c, d = generation.tokens
        counts[((a * V + b) * V + c) * V + d] += 1
        deep += generation.steps[0].accepted >= 3
    return counts, deep


def law_p_value(target, counts: np.ndarray) -> float:
    expected = exact_law(target) * counts.sum()
    rare = expected < 5  # chi-square wants >= 5 expected per cell: pool the rare ones
    observed = np.append(counts[~rare], counts[rare].sum())
    wanted = np.append(expected[~rare], expected[rare].sum())
    return float(chisquare(observed, wanted / wanted.sum() * observed.sum())[1])


def test_the_registry_has_the_four_heads_methods():
    assert set(HEADS_METHODS) >= {"medusa", "hydra", "eagle", "eagle3"}


@pytest.mark.parametrize("method, knobs", CONFIGS, ids=[m for m, _ in CONFIGS])
def test_sampled_tokens_follow_the_target_with_deep_nodes_accepted(target, heads, method, knobs):
    counts, deep = first_tokens(target, heads, method, knobs)
    assert deep >= 0.05 * SAMPLES, f"{method}: depth 3 was accepted in only {deep} of {SAMPLES} first steps"
    p_value = law_p_value(target, counts)
    assert p_value > MIN_P, f"{method}: chi-square p={p_value:.2g} (deep acceptances {deep})"


@pytest.mark.parametrize("method, knobs", CONFIGS, ids=[m for m, _ in CONFIGS])
def test_the_wrong_q_mutant_is_caught(target, heads, method, knobs):  # ppd: the wrong-temperature mutant (MUTANTS)
    counts, _ = first_tokens(target, heads, method, knobs, mutant=True, samples=MUTANT_SAMPLES)
    p_value = law_p_value(target, counts)
    assert p_value < MIN_P, f"{method}: the wrong-q mutant passed (p={p_value:.2g})"
