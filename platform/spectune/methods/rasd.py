"""`rasd` and `rasd-eagle3`: retrieval-augmented speculative decoding (Quan et al. 2025).

Each step drafts two trees and verifies one:

1. the drafter (rasd: the pair's draft model; rasd-eagle3: EAGLE-3's trained heads) grows a dynamic
   tree (dytree's best-first expansion by path probability: `draft_nodes` nodes, at most `draft_depth`
   deep, `draft_topk` children a node);
2. retrieval finds the longest suffix of the committed sequence (`min_ngram`..`max_ngram` tokens)
   in the datastore and keeps up to `retrieved` continuations of `retrieval_depth` tokens, the most
   frequent first: those of the prompt and the output so far, then, for the slots left, those of
   the corpus `datastore` points at (if any);
3. `spectune.trees.fusion` merges the continuations into the drafter's tree by longest prefix
   match and prunes the result to the `budget` best nodes (at temperature 0; when sampling, see
   below).

The score pruning ranks by (RASD's): a drafter node's path probability, and for retrieved
nodes the continuations' share of the retrieval counts times the drafter's probability of
their first token (the draft model's distribution prunes the retrieval tree); a node both
propose takes the larger.

Lossless by the rules the tree methods already use (engine/accept.py's recursive rejection):

- temperature 0: the drafter's part is its top-k, the fused tree is pruned to the budget and
  verified by greedy match;
- temperature > 0: the fused tree mixes the drafter's sampled nodes (drawn without replacement
  from its q, as dytree draws them, and never pruned by the drawn tokens' own probabilities, which
  would bias the proposal) with retrieved tokens, which were drawn from no distribution. A
  retrieved token is a one-hot proposal (q = 1 at the token: accepted with probability p(token),
  the residual is p without it, PLD's sample-and-match), and one-hot rows cannot share a node with
  draws from q, so retrieval adds nodes only as one-child chains below the drafter's leaves
  (`spectune.trees.fusion.extend_leaves`), while a continuation that matches a sampled branch still
  shares its nodes. Every node's children are then the draws from its q row or one token under a
  one-hot row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from pydantic import Field, model_validator

from spectune.engine.drafter import DraftContext, StepOutcome
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling
from spectune.trees.draft import DraftTree
from spectune.trees.fusion import Retrieved, ScoredTree, extend_leaves, fuse, prune
from spectune.methods.base import HEADS_ON_A_HYBRID, Knobs, Models
from spectune.methods.datastore import NgramIndex, corpus_index, read_texts, target_tokenizer
from spectune.heads.load import LoadedHeads, load_heads
from spectune.methods.draft_cache import ModelDrafter
from spectune.methods.heads_eagle import EagleDrafter, EagleKnobs
from spectune.methods.dytree import DyTreeKnobs, Expansion, grow
from spectune.methods.registry import METHODS

GREEDY = Sampling()  # the drafter's top-k at temperature 0


class RetrievalKnobs(Knobs):
    """What retrieval fuses into a drafted tree, whatever drafted it (rasd's model, rasd-eagle3's heads)."""

    datastore: str | None = Field(
        None, description="a UTF-8 text file, or a folder of them, to retrieve from besides the prompt and the "
        "output so far (None: those alone); a path where the drafter is built (a sweep's workers, a serve "
        "replica), tokenized with the target's tokenizer and indexed once per build")
    retrieval_depth: int = Field(8, ge=1, le=64, description="tokens per retrieved continuation")
    retrieved: int = Field(4, ge=1, le=64, description="continuations fused per step, the most frequent first")
    min_ngram: int = Field(1, ge=1, le=16, description="shortest suffix n-gram retrieval matches")
    max_ngram: int = Field(4, ge=1, le=16, description="longest suffix n-gram retrieval matches (longest found wins)")
    draft_depth: int = Field(4, ge=1, le=64, description="the drafted tree's deepest position (a pass per level)")
    draft_topk: int = Field(4, ge=1, le=64, description="most children the drafter proposes under one node")
    draft_nodes: int = Field(16, ge=1, le=512, description="nodes of the drafted dynamic tree before fusion")
    budget: int = Field(24, ge=1, le=1024, description="fusion budget: nodes of the fused tree verified per step")

    def tree_knobs(self) -> str:
        return f"budget={self.budget}"

    @model_validator(mode="after")
    def ordered(self) -> "RetrievalKnobs":
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})")
        return self

    def drafter_tree(self) -> DyTreeKnobs:
        return DyTreeKnobs(budget=min(self.draft_nodes, self.budget), max_depth=self.draft_depth, topk=self.draft_topk)


class RasdKnobs(RetrievalKnobs):
    """RASD with the pair's draft model growing the tree."""


class RasdEagleKnobs(RetrievalKnobs):
    """RASD with EAGLE-3's trained heads growing the tree (the paper fuses EAGLE-2's tree too)."""

    heads: str | None = Field(None, description="heads folder (default: <pair>/heads/eagle3 beside the pair's target/)")


class Retrieval:
    """Retrieval and fusion apart from the tree they fuse into: the sequence's and the corpus's n-gram
    indexes, the continuations of the sequence's suffix, and the fused, pruned tree (see the module)."""

    def __init__(self, knobs: RetrievalKnobs, corpus: NgramIndex | None) -> None:
        self.knobs = knobs
        self.corpus = corpus
        self.sequence_index = NgramIndex(knobs.min_ngram, knobs.max_ngram)
        self.stats: Counter[str] = Counter()  # verified / accepted nodes that retrieval alone proposed
        self.retrieval_only: tuple[bool, ...] = ()  # per node of the last draft: retrieval alone proposed it

    def reset(self) -> None:
        self.sequence_index = NgramIndex(self.knobs.min_ngram, self.knobs.max_ngram)

    def index(self, sequence: Sequence[int]) -> None:
        """The prompt first, then what was committed since."""
        self.sequence_index.extend(sequence[len(self.sequence_index):])

    def fused(self, grown: Expansion, calls: int, root_logits: torch.Tensor, context: DraftContext) -> DraftTree:
        """The drafted tree (`grown`, `calls` drafting passes) with the retrieved continuations fused in."""
        first_probs = torch.softmax(root_logits.float(), dim=-1)  # [V] prunes retrieval by the drafter's view
        retrieved = self._retrieve(context.sequence, min(self.knobs.retrieval_depth, context.max_depth), first_probs)
        if context.sampling.greedy:
            return self._fused_greedy(grown, calls, retrieved)
        return self._fused_sampled(grown, calls, retrieved)

    def _fused_greedy(self, expansion: Expansion, calls: int, retrieved: list[Retrieved]) -> DraftTree:
        """Temperature 0: fuse, prune to the budget; deterministic (greedy match)."""
        drafted = ScoredTree.drafted(expansion.tree.tokens, expansion.tree.parents, expansion.values)
        fused = prune(fuse(drafted, retrieved), self.knobs.budget)
        self.retrieval_only = fused.from_retrieval()
        return fused.draft_tree(calls)

    def _fused_sampled(self, expansion: Expansion, calls: int, retrieved: list[Retrieved]) -> DraftTree:
        """Temperature > 0: the drafter's sampled tree as drawn, retrieved chains below its leaves (up to the
        budget); q holds the drafter's rows and a one-hot row above every retrieved token."""
        tree = expansion.tree
        drafted = ScoredTree.drafted(tree.tokens, tree.parents, expansion.values)
        fused = extend_leaves(drafted, retrieved, self.knobs.budget - drafted.size)
        self.retrieval_only = fused.from_retrieval()
        vocab = next(iter(tree.q_rows.values())).shape[-1]
        q = torch.zeros(len(fused.tokens), vocab)  # [n+1, V] rows of leaves stay zero (never read)
        for node, row in tree.q_rows.items():
            q[node] = row
        for node in range(len(tree.tokens), len(fused.tokens)):  # a retrieved node: its parent's only child
            q[fused.parents[node]] = 0.0
            q[fused.parents[node], fused.tokens[node]] = 1.0  # one-hot: accepted with probability p(token)
        return DraftTree(fused.tokens, fused.parents, q, calls)

    def _retrieve(self, sequence: Sequence[int], depth: int, first_probs: torch.Tensor) -> list[Retrieved]:
        """Up to `retrieved` continuations, the sequence's own first (the nearest text repeats most; on the
        micro pair, mixing the corpus in by share lowered tau), then the corpus's, each source's by share;
        weighted by the drafter's probability of their first token."""
        ranked = _ranked(self.sequence_index.continuations(sequence, depth, recent=True), self.knobs.retrieved)
        room = self.knobs.retrieved - len(ranked)
        if self.corpus is not None and room > 0:
            seen = {tokens for tokens, _ in ranked}
            found = self.corpus.continuations(sequence, depth, recent=False)
            ranked += [(tokens, share) for tokens, share in _ranked(found, len(found)) if tokens not in seen][:room]
        return [Retrieved(tokens, share * float(first_probs[tokens[0]])) for tokens, share in ranked]

    def observe(self, outcome: StepOutcome) -> None:
        only = self.retrieval_only
        self.stats["steps"] += 1
        self.stats["retrieved_nodes"] += sum(only)
        self.stats["accepted_retrieved"] += sum(only[node] for node in outcome.verdict.path[1:])


class RasdDrafter(ModelDrafter):
    """The draft model's dynamic tree fused with retrieval; `corpus` is indexed once, at build."""

    def __init__(self, lm: CausalLM, knobs: RasdKnobs, corpus: NgramIndex | None) -> None:
        super().__init__(lm)
        self.knobs = knobs
        self.tree_knobs = knobs.drafter_tree()  # its node count capped at the fusion budget
        self.retrieval = Retrieval(knobs, corpus)
        self.max_tree_size = knobs.budget

    def reset(self) -> None:
        super().reset()
        self.retrieval.reset()

    def draft(self, context: DraftContext) -> DraftTree:
        sequence = context.sequence
        self.retrieval.index(sequence)
        if context.max_depth == 0:
            return DraftTree.root_only(sequence[-1])
        root_logits = self.start(sequence)  # [V] the drafter's logits after the root
        sampling = GREEDY if context.sampling.greedy else context.sampling
        expansion = Expansion(sequence[-1], self.tree_knobs, min(self.knobs.draft_depth, context.max_depth),
                              sampling, context.rng)
        calls = grow(expansion, root_logits, lambda new: self.feed(expansion.tree, new)).draft_calls
        self.finish(expansion.tree)
        return self.retrieval.fused(expansion, calls, root_logits, context)

    def observe(self, outcome: StepOutcome) -> None:
        self.retrieval.observe(outcome)


class RasdEagleDrafter(EagleDrafter):
    """EAGLE-3's dynamic tree fused with retrieval (the paper's 'EAGLE-2 tree + PLD/REST' variant)."""

    def __init__(self, heads: LoadedHeads, knobs: RasdEagleKnobs, corpus: NgramIndex | None) -> None:
        self.retrieval = Retrieval(knobs, corpus)  # first: EagleDrafter.__init__ calls reset
        tree = knobs.drafter_tree()  # the heads' tree, its node count capped at the fusion budget
        super().__init__(heads, EagleKnobs(heads=knobs.heads, **tree.model_dump()))
        self.max_tree_size = knobs.budget

    def reset(self) -> None:
        super().reset()
        self.retrieval.reset()

    def draft(self, context: DraftContext) -> DraftTree:
        self.retrieval.index(context.sequence)
        grown = self.expand(context)
        if grown is None:
            return DraftTree.root_only(context.sequence[-1])
        return self.retrieval.fused(grown.expansion, grown.tree.draft_calls, grown.root_logits, context)

    def observe(self, outcome: StepOutcome) -> None:
        super().observe(outcome)
        self.retrieval.observe(outcome)


def _ranked(counts: Counter[tuple[int, ...]], most: int) -> list[tuple[tuple[int, ...], float]]:
    """The `most` non-empty continuations of largest share of the occurrences counted (ties: counting order)."""
    total = sum(counts.values())
    shares = [(tokens, count / total) for tokens, count in counts.items() if tokens]
    return sorted(shares, key=lambda item: -item[1])[:most]


@METHODS.register(
    "rasd",
    RasdKnobs,
    needs_drafter=True,
    summary="the drafter's dynamic tree fused with continuations retrieved from the prompt, the output and an "
    "optional corpus (longest prefix match), pruned to a node budget by draft probability and retrieval counts",
    paper="Quan et al. 2025, RASD: retrieval-augmented speculative decoding (ACL Findings); claims state-of-the-art "
    "speedups on DocQA, summarization, code and in-domain QA, fusing a draft model's (or EAGLE-2's) tree with PLD or "
    "REST retrieval. Measured here on the micro pair (24 shipped prompts, 64 tokens, spectune bench): greedy tau 5.9 "
    "with or without a stdlib datastore (dytree 3.7, pld 2.1); at T=1 tau 2.5 (dytree 2.4): micro's flat drafter "
    "seldom draws a retrieved start. On tiny (docs/benchmarks.md, 1 thread, greedy): tau 3.9-4.6, 1.96x of AR in "
    "bf16 and 1.52x in fp32 at budget 8, level with HF's prompt lookup (1.97x, 1.45x) and ahead of the drafter "
    "alone (sps 1.28x) and of PLD alone (1.83x); on SmolLM2 with its distilled drafter, tau 1.85-2.14 (PLD 1.39-1.44), "
    "1.29x in bf16 at budget 8 (hf-pld 1.23x, pld 1.36x), 0.76x in fp32",
    cost="one drafter pass per round, at most draft_depth; n-gram lookups; budget + 1 tokens verified",
    rule="greedy: top-k siblings and retrieved tokens, match; sampling: the drafter's Gumbel-top-k draws, recursive "
    "rejection, retrieved tokens as one-hot proposals (chains below the drafter's leaves)",
    columns={"draft_len": ("retrieval_depth", "draft_depth"), "node_budget": ("budget",)},
)
def build_rasd(knobs: RasdKnobs, models: Models) -> RasdDrafter:
    return RasdDrafter(models.drafter, knobs, _corpus(knobs, models, "rasd"))


@METHODS.register(
    "rasd-eagle3",
    RasdEagleKnobs,
    needs_drafter=False,
    needs_heads="eagle3",
    hybrid=HEADS_ON_A_HYBRID,
    summary="RASD with EAGLE-3's heads growing the tree: their dynamic tree fused with continuations retrieved "
    "from the prompt, the output and an optional corpus, pruned to a node budget",
    paper="Quan et al. 2025, RASD, its variant fusing EAGLE-2's tree with retrieval; here EAGLE-3's trained heads "
    "(spectune heads train --kind eagle3) grow the tree",
    cost="one pass of the heads' draft layer per round, at most draft_depth; n-gram lookups; budget + 1 tokens "
    "verified",
    rule="greedy: top-k siblings and retrieved tokens, match; sampling: the heads' Gumbel-top-k draws, recursive "
    "rejection, retrieved tokens as one-hot proposals (chains below the heads' leaves)",
    columns={"draft_len": ("retrieval_depth", "draft_depth"), "node_budget": ("budget",)},
)
def build_rasd_eagle3(knobs: RasdEagleKnobs, models: Models) -> RasdEagleDrafter:
    corpus = _corpus(knobs, models, "rasd-eagle3")
    return RasdEagleDrafter(load_heads(knobs.heads, "eagle3", models.target.model), knobs, corpus)


def _corpus(knobs: RetrievalKnobs, models: Models, method: str) -> NgramIndex | None:
    """The datastore's n-gram index, built once (None without one); a bad path is named before anything loads."""
    if knobs.datastore is None:
        return None
    try:
        texts = read_texts(knobs.datastore)
        tokenizer = target_tokenizer(models.target.model, knobs.datastore)
        return corpus_index(texts, tokenizer, knobs.min_ngram, knobs.max_ngram, knobs.datastore)
    except ValueError as err:
        raise ValueError(f"{method}: {err}") from None
