"""Turning logits into the distribution decoding samples from (temperature, top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[..., V] logits -> [..., V] probabilities after temperature and top-p (nucleus) filtering."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # [..., V]
    if sampling.top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [..., V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [..., V] mass of strictly better tokens
    sorted_probs = sorted_probs.masked_fill(mass_before >= sampling.top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)  # [..., V]
    return kept / kept.sum(dim=-1, keepdim=True)


# Every random draw in decoding comes from the loop's generator, a CPU `torch.Generator`, so a seed
# means the same random stream whatever device the models are on. A CPU generator cannot drive a
# draw on another device, and the uniforms it makes are CPU tensors, so each distribution comes to
# the CPU where it is sampled (`host`): one [V] row per draw, or per node on the accepted path, small
# next to the forward pass that made it, and the drawn token is read back to the host anyway. As
# contiguous float32: the same probabilities in another dtype, layout or device draw the same tokens.


def host(probs: torch.Tensor) -> torch.Tensor:
    """A [..., V] distribution as a contiguous float32 CPU tensor, ready for draws from a CPU generator."""
    return probs.detach().to(device="cpu", dtype=torch.float32).contiguous()


def sample(probs: torch.Tensor, rng: torch.Generator) -> int:
    """One token from a [V] distribution (on any device)."""
    return int(torch.multinomial(host(probs), 1, generator=rng))


def sample_with_replacement(probs: torch.Tensor, k: int, rng: torch.Generator) -> list[int]:
    """k independent tokens from a [V] distribution (on any device); tokens may repeat."""
    return torch.multinomial(host(probs), k, replacement=True, generator=rng).tolist()


def sample_without_replacement(probs: torch.Tensor, k: int, rng: torch.Generator) -> list[int]:
    """Up to k distinct tokens from a [V] distribution (on any device), in draw order (Gumbel-top-k).

    Never returns a zero-probability token, so fewer than k come back when the support is smaller.
    """
    probs = host(probs)
    k = min(k, int((probs > 0).sum()))
    uniform = torch.rand(probs.shape, generator=rng).clamp_(min=1e-20)  # [V]
    keys = probs.log() - (-uniform.log()).log()  # [V] log p + Gumbel noise
    return keys.topk(k).indices.tolist()
