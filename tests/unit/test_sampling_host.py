"""Draws come from the loop's CPU generator: the same law in any dtype, layout or device draws the same tokens.

No GPU runs these tests; a device other than the CPU is stood in for by what the sampling
boundary (`host`) must normalise all the same: dtype, non-contiguous views, grad-tracking tensors.
"""

import pytest
import torch

from spectune.engine.accept import accept_sampled
from spectune.engine.sampling import host, sample, sample_with_replacement, sample_without_replacement
from spectune.trees.draft import DraftTree

V = 50


def law(seed: int, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(vocab, generator=g), dim=-1)  # [V] float32, peaked enough to matter


def forms(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same float32 law as other tensors: wider dtype, strided view, tracked by autograd."""
    strided = torch.zeros(p.shape[-1], 3)
    strided[:, 1] = p
    return {
        "float32": p,
        "float64": p.double(),
        "strided": strided[:, 1],  # stride 3, not contiguous
        "grad": p.clone().requires_grad_(True),
    }


def draws(fn, p: torch.Tensor, seed: int = 0, times: int = 20) -> list:
    rng = torch.Generator().manual_seed(seed)
    return [fn(p, rng) for _ in range(times)]


SAMPLERS = {
    "sample": sample,
    "without_replacement": lambda p, rng: sample_without_replacement(p, 4, rng),
    "with_replacement": lambda p, rng: sample_with_replacement(p, 4, rng),
}


def test_host_is_cpu_float32_contiguous_and_a_no_op_when_already_so():
    p = law(0)
    for name, form in forms(p).items():
        out = host(form)
        assert out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous(), name
        assert not out.requires_grad and torch.equal(out, p), name
    assert host(p).data_ptr() == p.data_ptr()  # the CPU path copies nothing


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_draw_the_same_tokens_from_every_form_of_a_law(sampler):
    p = law(1)
    expected = draws(SAMPLERS[sampler], p)
    assert len({str(t) for t in expected}) > 1  # the draws vary, so equality below means something
    for name, form in forms(p).items():
        assert draws(SAMPLERS[sampler], form) == expected, name


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_half_precision_law_draws_as_its_float32_value(sampler):
    half = law(2).half()
    assert draws(SAMPLERS[sampler], half) == draws(SAMPLERS[sampler], half.float())


def test_without_replacement_never_draws_outside_the_support_of_any_form():
    p = law(3)
    p[10:] = 0
    p /= p.sum()
    for name, form in forms(p).items():
        for tokens in draws(lambda q, rng: sample_without_replacement(q, 20, rng), form):
            assert len(tokens) == 10 and max(tokens) < 10, name


def tree_and_laws(seed: int) -> tuple[DraftTree, torch.Tensor]:
    """Root with 3 siblings drawn without replacement, one of them with a child: q and p rows per node."""
    q = torch.stack([law(seed + i) for i in range(5)])  # [5, V]
    p = torch.stack([law(seed + 10 + i) for i in range(5)])  # [5, V]
    tokens = (7, *q[0].topk(3).indices.tolist(), int(q[1].argmax()))
    return DraftTree(tokens, (-1, 0, 0, 0, 1), q), p


def verdicts(tree: DraftTree, p: torch.Tensor, times: int = 30) -> list:
    rng = torch.Generator().manual_seed(5)
    return [accept_sampled(tree, p, rng) for _ in range(times)]


def test_recursive_rejection_rules_the_same_on_every_form_of_the_laws():
    tree, p = tree_and_laws(0)
    expected = verdicts(tree, p)
    assert len(set(expected)) > 1
    strided = torch.zeros(p.shape[1], p.shape[0]).T  # [5, V] view of column-major storage
    strided.copy_(p)
    assert not strided.is_contiguous()
    for name, target in {"float64": p.double(), "strided": strided, "grad": p.clone().requires_grad_(True)}.items():
        assert verdicts(tree, target) == expected, name
    wide_q = DraftTree(tree.tokens, tree.parents, tree.q.double())
    assert verdicts(wide_q, p) == expected
    assert verdicts(tree, p.half()) == verdicts(tree, p.half().float())


def test_accept_leaves_the_callers_tensors_untouched():
    tree, p = tree_and_laws(1)
    p_before, q_before = p.clone(), tree.q.clone()
    verdicts(tree, p)
    assert torch.equal(p, p_before) and torch.equal(tree.q, q_before)
