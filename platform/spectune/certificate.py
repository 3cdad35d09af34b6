"""The greedy lossless certificate: is every emitted token the target's argmax, within the rounding of its dtype?

"Identical to AR" is the certificate in fp32, where a correct method reproduces plain greedy
decoding token for token. In bf16 it is not: a tree verification, a batched prefill and a
one-token step each round differently, so two correct implementations part ways wherever the
top two logits are within rounding of each other (measured here: our AR and HF's AR differ on 5
of 8 prompts with SmolLM2 in bf16). So each output is checked numerically instead: ONE
teacher-forced target forward over prompt + output gives the logits at every emitted position,
and the emitted token's logit must lie within a tolerance of the largest one.

The tolerance follows from the dtype. A logit z is stored with a spacing (one unit in the last
place) of about eps * |z|, eps = torch.finfo(dtype).eps (bf16 2^-7, fp16 2^-10, fp32 2^-23);
the decoding pass and the checking pass each round it, and the rounding accumulated through the
layers shows up at that scale too (measured with SmolLM2 in bf16: HF's own greedy output,
teacher-forced, had its worst token 0.125 below the argmax at logits of about 16-20, one unit).
The default allows two units: ``tolerance = 2 * eps * max(|z_argmax|, 1)`` at each position,
about 0.3 for bf16 logits near 20 and 5e-6 for fp32. A token further below the argmax is a real
deviation: a bug, or a lossy method.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass


import torch

from spectune.engine.runner import CausalLM
from spectune.lossless import LosslessStatus, decide

DEFAULT_TOLERANCE_ULPS = 2.0


@dataclass(frozen=True)
class TokenCheck:
    """One emitted token that failed: where, by how much, and what was allowed there."""

    prompt_index: int
    position: int  # index into the output (0 = the first new token)
    token: int
    argmax: int
    margin: float  # argmax logit - emitted token's logit
    tolerance: float


@dataclass(frozen=True)
class Certificate:
    status: LosslessStatus  # exact | within_tolerance | lossy (decided by spectune.lossless.decide)
    exact_match_rate: float  # share of outputs identical to the reference's
    worst_margin: float  # the largest (argmax logit - emitted logit) over every emitted token
    tolerance_ulps: float
    dtype: str
    failures: tuple[TokenCheck, ...] = ()  # tokens outside the tolerance (the first per prompt)

    @property
    def lossless(self) -> bool:
        return self.status.certified


def tolerance(top_logits: torch.Tensor, dtype: torch.dtype, ulps: float = DEFAULT_TOLERANCE_ULPS) -> torch.Tensor:
    """Allowed margin at each position: `ulps` units in the last place of the argmax logit, in `dtype`. [n] -> [n]"""
    check_ulps(ulps)
    return ulps * torch.finfo(dtype).eps * top_logits.abs().clamp_min(1.0)


def check_ulps(ulps: float) -> None:
    if not ulps >= 0:  # also NaN
        raise ValueError(f"the certificate's tolerance must be >= 0 units of rounding, got {ulps}")


@torch.inference_mode()
def margins(target: CausalLM, prompt: Sequence[int], output: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-force prompt + output in one forward: (argmax logit, emitted logit, argmax id) per emitted token, each [m]."""
    if not prompt or not output:
        raise ValueError("the certificate needs a prompt and at least one emitted token")
    target.reset()
    logits = target.forward([*prompt, *output[:-1]])  # [len(prompt)+m-1, V]
    at = logits[len(prompt) - 1 :]  # [m, V]: row j predicts output[j]
    top, argmax = at.max(dim=-1)  # [m], [m]
    emitted = at.gather(1, torch.tensor(list(output), device=at.device).unsqueeze(1)).squeeze(1)  # [m]
    target.reset()
    return top.cpu(), emitted.cpu(), argmax.cpu()


# Checked outputs per model: AR's reference outputs recur in every configuration's certificate of a
# run (its exact prompts), so each is teacher-forced once. Weak keys: a model's entries go with it.
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CHECKED_PER_MODEL = 4096


def _margins_once(target: CausalLM, prompt: Sequence[int], output: Sequence[int]):
    seen = _CHECKED.setdefault(target.model, {})
    key = (tuple(prompt), tuple(output))
    if key not in seen:
        if len(seen) >= _CHECKED_PER_MODEL:
            seen.clear()
        seen[key] = margins(target, prompt, output)
    return seen[key]


def certify(target: CausalLM, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[Sequence[int]]],
            references: Sequence[Sequence[int]], ulps: float = DEFAULT_TOLERANCE_ULPS) -> Certificate:
    """Certify the greedy outputs of one configuration: `outputs[i]` holds every output prompt i got
    (one per repeat); `references[i]` is AR's. Every distinct output is checked against the target."""
    check_ulps(ulps)
    dtype = target.dtype
    exact = [all(list(o) == list(r) for o in outs) for outs, r in zip(outputs, references, strict=True)]
    worst, failures = 0.0, []
    for i, (prompt, outs) in enumerate(zip(prompts, outputs, strict=True)):
        for output in dict.fromkeys(tuple(o) for o in outs if o):  # distinct, in order
            top, emitted, argmax = _margins_once(target, prompt, output)
            gap = (top - emitted).clamp_min(0)  # [m]
            allowed = tolerance(top, dtype, ulps)  # [m]
            worst = max(worst, float(gap.max()))
            outside = (gap > allowed).nonzero().flatten()
            if outside.numel():
                j = int(outside[0])
                failures.append(TokenCheck(i, j, int(output[j]), int(argmax[j]), float(gap[j]), float(allowed[j])))
                break
    return Certificate(decide(True, exact, len(failures)), sum(exact) / len(exact) if exact else 1.0, worst, ulps,
                       str(dtype).removeprefix("torch."), tuple(failures))
