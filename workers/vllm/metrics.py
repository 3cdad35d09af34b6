"""vLLM's own speculative-decoding counters, read from its Prometheus /metrics.

    vllm:spec_decode_num_drafts_total                      steps that drafted
    vllm:spec_decode_num_draft_tokens_total                draft tokens proposed
    vllm:spec_decode_num_accepted_tokens_total             draft tokens accepted
    vllm:spec_decode_num_accepted_tokens_per_pos_total{position="i"}   accepted at draft position i

Counters only grow: a pass's numbers are the difference of two readings (`SpecCounters.since`).
Mean acceptance length (tokens per step, the bonus token included) = 1 + accepted / drafts;
acceptance at position i = accepted_per_pos[i] / drafts (vLLM's definitions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

_SAMPLE = re.compile(r'^(vllm:spec_decode_[a-z_]+?)_total(?:\{([^}]*)\})?\s+([0-9.eE+-]+)$')
_POSITION = re.compile(r'position="(\d+)"')


@dataclass(frozen=True)
class SpecCounters:
    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted: float = 0.0
    accepted_per_pos: tuple[float, ...] = ()

    def since(self, before: SpecCounters) -> SpecCounters:
        per_pos = tuple(now - (before.accepted_per_pos[i] if i < len(before.accepted_per_pos) else 0.0)
                        for i, now in enumerate(self.accepted_per_pos))
        return SpecCounters(self.drafts - before.drafts, self.draft_tokens - before.draft_tokens,
                            self.accepted - before.accepted, per_pos)

    def plus(self, other: SpecCounters) -> SpecCounters:
        n = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        pad = lambda t: t + (0.0,) * (n - len(t))  # noqa: E731
        per_pos = tuple(a + b for a, b in zip(pad(self.accepted_per_pos), pad(other.accepted_per_pos), strict=True))
        return SpecCounters(self.drafts + other.drafts, self.draft_tokens + other.draft_tokens,
                            self.accepted + other.accepted, per_pos)

    @property
    def mean_acceptance_length(self) -> float | None:
        return 1.0 + self.accepted / self.drafts if self.drafts else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.draft_tokens if self.draft_tokens else None

    @property
    def acceptance_by_position(self) -> tuple[float, ...]:
        return tuple(a / self.drafts for a in self.accepted_per_pos) if self.drafts else ()


def parse_counters(text: str) -> SpecCounters:
    """The spec-decode counters of a /metrics page, summed over engines (zeros when speculation is off)."""
    totals: dict[str, float] = {}
    per_pos: dict[int, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            position = _POSITION.search(labels)
            if position:
                index = int(position.group(1))
                per_pos[index] = per_pos.get(index, 0.0) + value
        else:
            totals[name] = totals.get(name, 0.0) + value
    positions = tuple(per_pos.get(i, 0.0) for i in range(max(per_pos) + 1)) if per_pos else ()
    return SpecCounters(totals.get("vllm:spec_decode_num_drafts", 0.0),
                        totals.get("vllm:spec_decode_num_draft_tokens", 0.0),
                        totals.get("vllm:spec_decode_num_accepted_tokens", 0.0), positions)


def read_counters(url: str, timeout_s: float = 10.0) -> SpecCounters:
    return parse_counters(httpx.get(f"{url}/metrics", timeout=timeout_s).text)
