"""Lossless greedy on the hybrid pair (a Bamba target of Mamba-2 and attention layers): every method that
declares hybrid support, over the shipped prompts, equals AR token for token, and really drafts (steps that
accept two or more draft tokens occur). A rejected draft rolls the SSM states back from the recorded
per-token states; an accepted prefix keeps the state after its last token; a tree goes through the SSM layers
by STree (every node's state from its parent's), its commit keeping the accepted node's state."""

import pytest

from spectune.engine.loop import Decoder
from spectune.engine.sampling import Sampling
from spectune.methods import METHODS
from spectune.pair import load_pair
from spectune.pair_ref import PairRef
from support import ar_references, shipped_prompt_ids

MAX_NEW = 40
CONFIGS = [
    ("sps", {}),
    ("sps", {"draft_len": 6, "schedule": "heuristic"}),
    ("pld", {}),
    ("pld", {"max_ngram": 2, "draft_len": 4}),
    ("pld", {"matches": 4, "draft_len": 6}),  # a trie: a tree through the SSM layers (STree)
    ("tree", {}),
    ("tree", {"branching": [4, 2, 2, 1]}),
    ("dytree", {}),
    ("stree", {}),
    ("stree", {"verify": "branches"}),
    ("stree", {"verify": "branches", "branching": [4, 2, 2, 1]}),
]


@pytest.fixture(scope="module")
def pair(hybrid_micro_pair):
    return load_pair(PairRef.model_validate({"dir": hybrid_micro_pair}))


@pytest.fixture(scope="module")
def prompts(pair):
    return shipped_prompt_ids(pair)


@pytest.fixture(scope="module")
def reference(pair, prompts):
    return ar_references(pair, prompts, MAX_NEW)


@pytest.mark.parametrize("method, knobs", CONFIGS, ids=[f"{m}-{k}" if k else m for m, k in CONFIGS])
def test_hybrid_greedy_output_equals_ar(pair, prompts, reference, method, knobs):
    models = pair.runners()
    assert models.target.cache.hybrid
    decoder = Decoder(models.target, METHODS.build(method, knobs, models), pair.eos_token_id)
    deep = 0  # steps that accepted 2+ draft tokens
    for pid, ids in prompts:
        generation = decoder.generate(ids, MAX_NEW, Sampling(), seed=0)
        expected = reference[pid]
        first_diff = next((i for i, (a, b) in enumerate(zip(generation.tokens, expected)) if a != b), None)
        assert generation.tokens == expected, f"{method} {knobs} prompt {pid}: differs at token {first_diff}"
        deep += sum(s.accepted >= 2 for s in generation.steps)
    assert deep > 0, f"{method} {knobs}: no step accepted 2+ draft tokens"


def test_concurrent_decoders_over_one_hybrid_model_stay_lossless(pair, prompts, reference):
    """Serving runs decoders in threads over one loaded model: STree's tree rides in a ContextVar, so a tree
    verification in one thread never turns another thread's chain or prefill into a tree scan."""
    from concurrent.futures import ThreadPoolExecutor

    configs = [("stree", {}), ("sps", {}), ("stree", {"verify": "branches"}), ("pld", {"matches": 4})]

    def decode(config):
        models = pair.runners()
        decoder = Decoder(models.target, METHODS.build(*config, models), pair.eos_token_id)
        return [(pid, decoder.generate(ids, MAX_NEW).tokens) for pid, ids in prompts[:8]]

    with ThreadPoolExecutor(max_workers=len(configs)) as pool:
        for config, outputs in zip(configs, pool.map(decode, configs)):
            for pid, tokens in outputs:
                assert tokens == reference[pid], f"{config} prompt {pid}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_spectune_serve_answers_with_stree_on_a_hybrid_pair_like_ar(hybrid_micro_pair, pair, prompts, reference, tmp_path):
    """The endpoint takes a hybrid pair too: `spectune serve` (Ray Serve, its own process) with stree, each greedy
    answer the same text as AR's."""
    import httpx

    from support import serving

    config = {"pair": str(hybrid_micro_pair), "method": "stree", "knobs": {"branching": [3, 2, 1]}}
    with serving(config, tmp_path) as served, httpx.Client(base_url=served.url, timeout=120) as http:
        assert http.get("/config").json()["method"] == "stree"
        for pid, ids in prompts[:3]:
            text = pair.decode(ids)
            body = http.post("/v1/completions", json={"prompt": text, "max_tokens": MAX_NEW, "temperature": 0}).json()
            assert pair.encode(text) == ids  # the prompt round-trips, so the server decodes what AR decoded
            assert body["choices"][0]["text"] == pair.decode(reference[pid]), pid
            assert body["speculative"]["method"] == "stree" and 1 <= body["speculative"]["target_calls"] <= MAX_NEW
