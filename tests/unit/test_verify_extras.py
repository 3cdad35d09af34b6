"""The engine's extra verification positions (`Drafter.verify_extras`, PPD's prompt tokens): appended after the
tree's nodes in the same forward, they leave the tree's logits as they were, give what the same embeddings would
give after the node they hang under, and never stay in the cache."""

import torch

from spectune.engine.drafter import DraftContext, Drafter
from spectune.engine.loop import Decoder
from spectune.engine.runner import EXTRA_SLOT, CausalLM
from spectune.trees.draft import DraftTree, VerifyExtras, tree_inputs
from support import random_llama

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
TREE = DraftTree(tokens=(6, 5, 3, 5, 8), parents=(-1, 0, 0, 1, 1))  # root, two children, two grandchildren


def extras_under(nodes: tuple[int, ...], per_node: int, d: int, n: int, seed: int = 0) -> VerifyExtras:
    """`per_node` chained extras under each of `nodes` (random embeddings), after a tree of n+1 nodes."""
    embeddings = torch.randn(len(nodes) * per_node, d, generator=torch.Generator().manual_seed(seed))
    parents = []
    for node in nodes:
        for j in range(per_node):
            parents.append(node if j == 0 else n + 1 + len(parents) - 1)
    return VerifyExtras(embeddings, tuple(parents))


def verify(lm: CausalLM, tree: DraftTree, extras: VerifyExtras | None, layers=(2,)):
    lm.reset()
    lm.forward(PROMPT)
    parents = tree.parents if extras is None else extras.joined(tree.parents)
    inputs = tree_inputs(parents, len(lm.cache))
    return lm.verify(tree.tokens, inputs.positions, inputs.mask, layers, None if extras is None else extras.embeddings)


def test_with_extras_the_trees_logits_equal_those_without():
    lm = CausalLM(random_llama(seed=3, vocab=16, layers=2))
    plain = verify(lm, TREE, None)
    extras = extras_under((0, 1, 3, 4), per_node=2, d=32, n=TREE.size)
    with_extras = verify(lm, TREE, extras)
    torch.testing.assert_close(with_extras.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_extras.hidden[2], plain.hidden[2], rtol=1e-5, atol=1e-5)
    assert with_extras.extras.logits.shape == (8, 16) and with_extras.extras.hidden[2].shape == (8, 32)
    assert plain.extras is None
    assert lm.cache.tokens[-8:] == (EXTRA_SLOT,) * 8  # appended, recorded as no token


def test_an_extra_sees_exactly_the_path_to_its_node():
    """The extras under node 3 (path root -> 1 -> 3) give what those embeddings give after that path alone."""
    target = random_llama(seed=4, vocab=16, layers=2)
    lm = CausalLM(target)
    extras = extras_under((0, 3), per_node=2, d=32, n=TREE.size, seed=1)
    got = verify(lm, TREE, extras).extras.logits  # [4, V]
    embed = target.get_input_embeddings()
    path = torch.tensor([PROMPT + [TREE.tokens[0], TREE.tokens[1], TREE.tokens[3]]])
    with torch.no_grad():
        chained = torch.cat([embed(path), extras.embeddings[2:4][None]], dim=1)  # [1, P+3+2, d]
        reference = target(inputs_embeds=chained).logits[0, -2:]  # [2, V]
        under_root = target(inputs_embeds=torch.cat([embed(torch.tensor([PROMPT + [6]])), extras.embeddings[:2][None]], 1))
    torch.testing.assert_close(got[2:], reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[:2], under_root.logits[0, -2:], rtol=1e-4, atol=1e-4)


def test_keep_drops_the_extras():
    lm = CausalLM(random_llama(seed=5, vocab=16, layers=2))
    verify(lm, TREE, extras_under((0, 2), per_node=3, d=32, n=TREE.size))
    past = len(PROMPT)
    lm.cache.keep(past, [0, 1, 4])
    assert lm.cache.tokens == tuple(PROMPT) + (6, 5, 8)


class _Prompted(Drafter):
    """Drafts nothing; asks for two extras under the root every step and records what came back."""

    max_tree_size = 2

    def __init__(self, d: int) -> None:
        self.embeddings = torch.randn(2, d, generator=torch.Generator().manual_seed(9))
        self.seen: list[torch.Tensor] = []

    def draft(self, context: DraftContext) -> DraftTree:
        return DraftTree.root_only(context.sequence[-1])

    def verify_extras(self, tree: DraftTree) -> VerifyExtras:
        return VerifyExtras(self.embeddings, (0, len(tree.tokens)))

    def observe(self, outcome) -> None:
        self.seen.append(outcome.extras.logits)


def test_the_loop_hands_extras_back_and_decodes_as_without():
    target = random_llama(seed=6, vocab=16, layers=2)
    plain = Decoder(CausalLM(target), _Plain()).generate(PROMPT, 6)
    drafter = _Prompted(32)
    prompted = Decoder(CausalLM(target), drafter).generate(PROMPT, 6)
    assert prompted.tokens == plain.tokens
    assert len(drafter.seen) == 6 and all(s.shape == (2, 16) for s in drafter.seen)


class _Plain(Drafter):
    max_tree_size = 0

    def draft(self, context: DraftContext) -> DraftTree:
        return DraftTree.root_only(context.sequence[-1])


def test_extras_that_hang_below_themselves_are_refused():
    extras = VerifyExtras(torch.zeros(2, 4), (0, 7))
    try:
        extras.joined(TREE.parents)
    except ValueError as err:
        assert "node 6 has parent 7" in str(err)
    else:
        raise AssertionError("an extra hanging under a later position was accepted")


class _PrefillPrompted(_Prompted):
    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.at_prefill: list[torch.Tensor] = []

    def prefilled_extras(self, outputs) -> None:
        self.at_prefill.append(outputs.logits)


def test_the_prefill_runs_the_extras_under_its_last_token_and_drops_them():
    target = random_llama(seed=7, vocab=16, layers=2)
    drafter = _PrefillPrompted(32)
    lm = CausalLM(target)
    Decoder(lm, drafter).generate(PROMPT, 1)
    (got,) = drafter.at_prefill
    embed = target.get_input_embeddings()
    with torch.no_grad():
        chained = torch.cat([embed(torch.tensor([PROMPT[:-1]])), drafter.embeddings[None]], dim=1)
        reference = target(inputs_embeds=chained).logits[0, -2:]  # [2, V] the extras after the prompt but its root
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    assert EXTRA_SLOT not in lm.cache.tokens


def test_the_extras_count_in_the_tokens_verified_per_step():
    from spectune.metrics import step_metrics

    target = random_llama(seed=6, vocab=16, layers=2)
    generation = Decoder(CausalLM(target), _Prompted(32)).generate(PROMPT, 4)
    assert [s.extras for s in generation.steps] == [2, 2, 2, 2]
    assert step_metrics([generation]).tree_tokens_per_step == 3.0  # the root and two extras each step
