"""RASD: the fusion and pruning of a drafter's tree with retrieved continuations (pure, no model), the n-gram
indexes retrieval reads, the datastore's bad inputs refused at build in one line, and the corpus really
drafting on the micro pair."""

import random
import re

import pytest
import torch

from spectune.engine.drafter import DraftContext
from spectune.engine.loop import Decoder
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling
from spectune.methods import METHODS
from spectune.methods.base import Models
from spectune.methods.datastore import BOUNDARY, NgramIndex, read_texts
from spectune.pair import load_pair
from spectune.pair_ref import PairRef
from spectune.trees.draft import tree_layout
from spectune.trees.fusion import Retrieved, ScoredTree, extend_leaves, fuse, prune
from support import random_llama

# the drafter's tree: root 0 -> 1 (p .6) -> 2 (p .3); root -> 3 (p .2)
DRAFTED = ScoredTree.drafted(tokens=(0, 1, 2, 3), parents=(-1, 0, 1, 0), probabilities=(1.0, 0.6, 0.3, 0.2))


# --- fusion ------------------------------------------------------------------------------------------------


def test_a_continuation_that_follows_a_drafter_branch_shares_its_nodes():
    fused = fuse(DRAFTED, [Retrieved((1, 2, 7), 0.5)])
    assert fused.tokens == (0, 1, 2, 3, 7) and fused.parents == (-1, 0, 1, 0, 2)  # only 7 is new, under 2
    assert fused.retrieval_scores == (0.0, 0.5, 0.5, 0.0, 0.5)
    assert fused.draft_scores == (1.0, 0.6, 0.3, 0.2, 0.0)
    assert fused.from_retrieval() == (False, False, False, False, True)


def test_a_continuation_branches_off_where_it_first_differs():
    fused = fuse(DRAFTED, [Retrieved((1, 5, 6), 0.4)])
    assert fused.tokens == (0, 1, 2, 3, 5, 6) and fused.parents == (-1, 0, 1, 0, 1, 4)


def test_continuations_sharing_a_prefix_add_their_weights_and_siblings_stay_distinct():
    fused = fuse(DRAFTED, [Retrieved((8, 9), 0.25), Retrieved((8, 4), 0.125), Retrieved((8, 9), 0.0625)])
    assert fused.tokens == (0, 1, 2, 3, 8, 9, 4) and fused.parents == (-1, 0, 1, 0, 0, 4, 4)
    assert fused.retrieval_scores[4:] == (0.4375, 0.3125, 0.125)
    for kids in tree_layout(fused.parents).children:
        assert len({fused.tokens[k] for k in kids}) == len(kids)


def test_a_node_scores_the_larger_of_its_draft_and_retrieval_estimates():
    fused = fuse(DRAFTED, [Retrieved((3,), 0.5), Retrieved((1,), 0.1)])
    assert fused.score(3) == 0.5 and fused.score(1) == 0.6


def test_fusion_refuses_a_negative_weight():
    with pytest.raises(ValueError, match="weight must be >= 0"):
        fuse(DRAFTED, [Retrieved((1,), -0.1)])


def test_a_scored_tree_needs_a_score_per_node_and_parents_first():
    with pytest.raises(ValueError, match="one token and two scores per node"):
        ScoredTree((0, 1), (-1, 0), (1.0,), (0.0, 0.0))
    with pytest.raises(ValueError, match="parents must come before"):
        ScoredTree.drafted((0, 1, 2), (-1, 2, 0), (1.0, 0.5, 0.5))


# --- pruning -----------------------------------------------------------------------------------------------


def test_pruning_keeps_the_best_nodes_and_renumbers_parents_first():
    fused = fuse(DRAFTED, [Retrieved((3, 4, 5), 0.5)])  # 3 now scores .5, and its retrieved children .5
    kept = prune(fused, 4)
    assert kept.tokens == (0, 1, 3, 4, 5) and kept.parents == (-1, 0, 0, 2, 3)  # node 2 (.3) is dropped
    assert kept.size == 4
    tree = kept.draft_tree(draft_calls=3)
    assert (tree.tokens, tree.parents, tree.q, tree.draft_calls) == (kept.tokens, kept.parents, None, 3)


def test_pruning_within_budget_keeps_every_node_and_zero_keeps_the_root():
    fused = fuse(DRAFTED, [Retrieved((1, 2, 7), 0.5)])
    assert sorted(prune(fused, 100).tokens) == sorted(fused.tokens)
    assert prune(fused, 0).tokens == (0,)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        prune(fused, -1)


@pytest.mark.parametrize("seed", range(20))
def test_pruning_keeps_exactly_the_top_budget_nodes_of_the_fused_tree(seed):
    """Scores shrink from parent to child, so best-first growth takes the global top (score, then depth, then
    index) and the kept set is always a tree."""
    rng = random.Random(seed)
    tokens, parents, probs = [0], [-1], [1.0]
    for node in range(1, rng.randint(1, 15)):
        parent = rng.randrange(node)
        siblings = {tokens[c] for c in range(1, node) if parents[c] == parent}
        tokens.append(rng.choice([t for t in range(1, 12) if t not in siblings]))
        parents.append(parent)
        probs.append(probs[parent] * rng.choice([0.9, 0.5, 0.25, 0.1]))
    drafted = ScoredTree.drafted(tokens, parents, probs)
    retrieved = [Retrieved(tuple(rng.randrange(1, 12) for _ in range(rng.randint(1, 6))), rng.choice([0.5, 0.2, 0.05]))
                 for _ in range(rng.randint(0, 4))]
    fused = fuse(drafted, retrieved)
    depths = tree_layout(fused.parents).depths
    for budget in (0, 1, 3, 7, 40):
        kept = prune(fused, budget)
        order = sorted(range(1, len(fused.tokens)), key=lambda n: (-fused.score(n), depths[n], n))
        expected = {_path(fused, n) for n in order[:budget]}
        assert {_path(kept, n) for n in range(1, len(kept.tokens))} == expected
        tree_layout(kept.parents)  # parents come first


def _path(tree: ScoredTree, node: int) -> tuple[int, ...]:
    path = []
    while node > 0:
        path.append(tree.tokens[node])
        node = tree.parents[node]
    return tuple(reversed(path))


# --- the sampling form: retrieved chains below the drafter's leaves only ------------------------------------


def test_sampled_fusion_hangs_a_continuation_below_the_leaf_it_reaches():
    fused = extend_leaves(DRAFTED, [Retrieved((1, 2, 7, 8), 0.5)], room=10)
    assert fused.tokens == (0, 1, 2, 3, 7, 8) and fused.parents == (-1, 0, 1, 0, 2, 4)
    assert fused.retrieval_scores == (0.0, 0.5, 0.5, 0.0, 0.5, 0.5)


def test_sampled_fusion_never_adds_a_sibling_to_the_drafters_draws():
    # 5 would sit beside the draw 1 under the root; 1 -> 9 beside the draw 2 under node 1: both dropped
    fused = extend_leaves(DRAFTED, [Retrieved((5, 6), 0.9), Retrieved((1, 9), 0.8)], room=10)
    assert fused.tokens == DRAFTED.tokens and fused.parents == DRAFTED.parents


def test_sampled_fusion_gives_every_added_node_one_child_and_keeps_to_its_room():
    fused = extend_leaves(DRAFTED, [Retrieved((3, 4, 5), 0.5), Retrieved((3, 6), 0.4), Retrieved((3, 4, 5, 8), 0.3),
                                    Retrieved((1, 2, 7, 7, 7), 0.2)], room=4)
    # (3, 6) would branch beside the chain's 4: dropped; (3, 4, 5, 8) extends the chain's end; the last gets one node
    assert fused.tokens == (0, 1, 2, 3, 4, 5, 8, 7) and fused.parents == (-1, 0, 1, 0, 3, 4, 5, 2)
    children = tree_layout(fused.parents).children
    assert all(len(children[node]) <= 1 for node in range(len(DRAFTED.tokens), len(fused.tokens)))
    assert extend_leaves(DRAFTED, [Retrieved((3, 4, 5), 0.5)], room=0).tokens == DRAFTED.tokens


# --- the n-gram index -----------------------------------------------------------------------------------


def test_the_longest_indexed_suffix_wins_and_its_continuations_are_counted():
    index = NgramIndex(1, 3)
    index.extend([5, 6, 7, 1, 9, 6, 7, 2, 5, 6, 7, 1])
    # "6 7" ends at 2, 6 and 10, but "5 6 7" only at 2 and 10: the longer suffix decides
    assert index.continuations([4, 5, 6, 7], 2, recent=True) == {(1, 9): 1, (1,): 1}
    assert index.continuations([3, 6, 7], 1, recent=True) == {(1,): 2, (2,): 1}
    assert index.continuations([42], 3, recent=True) == {}


def test_recent_lookups_count_the_latest_occurrences_first():
    index = NgramIndex(1, 1)
    index.extend([3, 1, 3, 2, 3])
    assert list(index.continuations([3], 1, recent=True)) == [(2,), (1,)]
    assert list(index.continuations([3], 1, recent=False)) == [(1,), (2,)]


def test_documents_stay_apart_in_the_index():
    index = NgramIndex(1, 2)
    index.extend([1, 2, 3, BOUNDARY, 4, 1, 2])
    assert index.continuations([9, 1, 2], 4, recent=False) == {(3,): 1}  # stops at the document's end
    assert index.continuations([3, 4], 1, recent=False) == {(1,): 1}  # "3 4" spans two documents: never a key


def test_growing_the_index_token_by_token_equals_indexing_at_once():
    tokens = [random.Random(3).randrange(5) for _ in range(60)]
    whole, grown = NgramIndex(1, 3), NgramIndex(1, 3)
    whole.extend(tokens)
    for end in range(0, len(tokens), 7):
        grown.extend(tokens[len(grown):end])
    grown.extend(tokens[len(grown):])
    assert grown.starts == whole.starts


# --- the datastore: bad input is refused at build, in one line naming the path ---------------------------


@pytest.fixture(scope="module")
def random_pair() -> Models:
    return Models(CausalLM(random_llama(0)), CausalLM(random_llama(1)))


def _bad_datastores(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "binary.txt").write_bytes(b"ok \xff\xfe not utf-8")
    (tmp_path / "no_text").mkdir()
    (tmp_path / "no_text" / "blob.bin").write_bytes(bytes(range(128, 256)))
    (tmp_path / "no_text" / "blank.txt").write_text("")
    (tmp_path / "empty_folder").mkdir()
    return {
        "missing": (tmp_path / "nowhere.txt", "no such file or folder"),
        "empty file": (tmp_path / "empty.txt", "the file holds no text"),
        "undecodable bytes": (tmp_path / "binary.txt", r"not UTF-8 text \(byte 3 cannot be decoded\)"),
        "folder without text": (tmp_path / "no_text", "the folder holds no UTF-8 text file"),
        "empty folder": (tmp_path / "empty_folder", "the folder holds no UTF-8 text file"),
    }


@pytest.mark.parametrize("case", ["missing", "empty file", "undecodable bytes", "folder without text", "empty folder"])
def test_a_bad_datastore_is_refused_at_build_in_one_line_naming_it(tmp_path, random_pair, case):
    path, reason = _bad_datastores(tmp_path)[case]
    with pytest.raises(ValueError) as refused:
        METHODS.build("rasd", {"datastore": str(path)}, random_pair)
    message = str(refused.value)
    assert re.fullmatch(rf"rasd: datastore {re.escape(str(path))}: {reason}", message), message
    assert "\n" not in message
    assert len(random_pair.target.cache) == 0 and len(random_pair.drafter.cache) == 0, "refused before decoding"


def test_a_target_without_a_tokenizer_cannot_index_a_datastore(tmp_path, random_pair):
    text = tmp_path / "notes.txt"
    text.write_text("some text to retrieve from\n")
    with pytest.raises(ValueError, match=rf"^rasd: datastore {re.escape(str(text))}: cannot load the target's "
                                         r"tokenizer from '[^\n]*' \([^\n]*\)$"):
        METHODS.build("rasd", {"datastore": str(text)}, random_pair)


def test_a_folder_datastore_reads_its_text_files_and_skips_binaries(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second document")
    (tmp_path / "sub" / "c.bin").write_bytes(b"\xff\xfe\x00")
    (tmp_path / ".hidden").write_text("not read")
    assert read_texts(str(tmp_path)) == ["first document", "second document"]


def test_the_draft_len_column_is_the_retrieval_depth_else_the_drafter_depth():
    assert METHODS.config("rasd", {"retrieval_depth": 6, "draft_depth": 3}).columns.draft_len == 6
    assert METHODS.config("rasd", {"draft_depth": 3, "budget": 9}).columns.draft_len == 3
    assert METHODS.config("rasd", {"budget": 9}).columns.node_budget == 9


def test_knobs_refuse_an_inverted_ngram_range():
    with pytest.raises(ValueError, match=r"min_ngram \(3\) must be <= max_ngram \(2\)"):
        METHODS.config("rasd", {"min_ngram": 3, "max_ngram": 2})


# --- on the micro pair: what the corpus held is drafted -------------------------------------------------


@pytest.fixture(scope="module")
def micro(micro_pair):
    return load_pair(PairRef.model_validate({"dir": micro_pair}))


def test_the_corpus_continuation_of_the_suffix_is_in_the_draft(micro, tmp_path):
    corpus = "def frobnicate(widget):\n    return widget.quux_the_zorblax(42, 'glimmer')\n"
    (tmp_path / "corpus.txt").write_text(corpus)
    knobs = {"datastore": str(tmp_path / "corpus.txt"), "draft_nodes": 4, "budget": 40, "retrieval_depth": 6}
    drafter = METHODS.build("rasd", knobs, micro.runners())
    ids = micro.encode(corpus)
    cut = len(micro.encode("def frobnicate(widget):\n    return widget."))
    assert micro.encode(corpus[: len("def frobnicate(widget):\n    return widget.")]) == ids[:cut]
    drafter.reset()
    tree = drafter.draft(DraftContext(tuple(ids[:cut]), Sampling(), torch.Generator(), max_depth=16))
    paths = {tuple(tree.tokens[n] for n in path[1:]) for path in tree_layout(tree.parents).paths}
    expected = tuple(ids[cut: cut + 6])
    assert any(path[:6] == expected for path in paths), "the corpus continuation is not a path of the tree"
    assert tree.q is None  # deterministic: verified by match / sample-and-match


def test_without_a_datastore_the_prompt_is_the_datastore(micro):
    drafter = METHODS.build("rasd", {"draft_nodes": 2, "budget": 30, "retrieval_depth": 5}, micro.runners())
    ids = micro.encode("alpha_beta_gamma = delta_epsilon(zeta)\nalpha_beta_gamma")
    first = micro.encode("alpha_beta_gamma")
    assert ids[: len(first)] == first and ids[-len(first):] == first
    drafter.reset()
    tree = drafter.draft(DraftContext(tuple(ids), Sampling(), torch.Generator(), max_depth=16))
    assert drafter.retrieval.sequence_index.tokens == list(ids)
    expected = tuple(ids[len(first): len(first) + 5])
    paths = {tuple(tree.tokens[n] for n in path[1:]) for path in tree_layout(tree.parents).paths}
    assert any(path[:5] == expected for path in paths), "the prompt's own continuation is not a path of the tree"


def test_a_sampled_draft_puts_a_one_hot_row_above_every_retrieved_token(random_pair):
    """At temperature > 0 every node's children are the drafter's draws from its q row, or one retrieved token
    under a one-hot row (the rejection rule's deterministic proposal). The drafter draws its whole vocabulary
    of 16 under the root here, so the retrieved continuation always starts on a drawn leaf and hangs below it."""
    knobs = {"draft_nodes": 16, "draft_topk": 16, "draft_depth": 1, "retrieval_depth": 4, "budget": 24}
    drafter = METHODS.build("rasd", knobs, random_pair)
    sequence = (1, 2, 3, 4, 5, 1, 2)  # "1 2" was followed by 3 4 5 1
    for seed in range(4):
        drafter.reset()
        tree = drafter.draft(DraftContext(sequence, Sampling(temperature=1.0), torch.Generator().manual_seed(seed),
                                          max_depth=16))
        retrieved = drafter.retrieval.retrieval_only  # the nodes retrieval alone added
        assert tree.q is not None and sum(retrieved) == 3 and tree.size == 19
        children = tree_layout(tree.parents).children
        assert sorted(tree.tokens[k] for k in children[0]) == list(range(16))  # the draws, in draw order
        assert torch.allclose(tree.q[0].sum(), torch.tensor(1.0)) and tree.q[0].max() < 1.0
        start = next(k for k in children[0] if tree.tokens[k] == 3)
        chain = [start]
        while children[chain[-1]]:
            (only,) = children[chain[-1]]
            assert retrieved[only] and tree.q[chain[-1], tree.tokens[only]] == 1.0 and tree.q[chain[-1]].sum() == 1.0
            chain.append(only)
        assert [tree.tokens[n] for n in chain] == [3, 4, 5, 1]


def test_rasd_eagle3_verifies_and_accepts_retrieved_nodes_beside_the_heads_tree(micro, micro_heads):
    """EAGLE-3's heads grow the tree, retrieval fuses the sequence's own continuations into it: on a prompt that
    repeats itself, nodes that retrieval alone proposed are verified and accepted, and the output is AR's."""
    models = micro.runners()
    drafter = METHODS.build("rasd-eagle3", {"budget": 16, "draft_nodes": 4}, models)
    ids = micro.encode("for item in items:\n    total = total + item.value\n" * 4)
    fused = Decoder(models.target, drafter, micro.eos_token_id).generate(ids, 24, Sampling(), seed=0)
    plain = Decoder(models.target, METHODS.build("ar", {}, models), micro.eos_token_id).generate(ids, 24, Sampling())
    assert fused.tokens == plain.tokens
    assert drafter.retrieval.stats["retrieved_nodes"] > 0 and drafter.retrieval.stats["accepted_retrieved"] > 0
    assert drafter.max_tree_size == 16  # the fusion budget, not the heads' 4 nodes
