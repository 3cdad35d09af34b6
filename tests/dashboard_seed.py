"""A seeded results store for the dashboard tests, written through the store's real writer API.

Two sweeps of the same spec on two kinds of hardware: ``quick-cpu`` (done) and ``quick-gpu``
(running). Their metric dicts are shaped like `spectune bench --json` rows, with numbers
from a small acceptance model (acceptance ``a`` per position, so tau = (1 - a^(k+1)) / (1 - a))
so that fronts, dominated points and per-position curves look like a real sweep's. Each
sweep also holds an errored trial, a pending one and a lossy-by-design one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from spectune.config import DecodeConfig, KnobColumns
from spectune.results import DecodeResult
from spectune.store import Store, connect

CPU = {"device": "cpu", "cpu_model": "AMD EPYC 7B13", "gpu_model": None, "n_cpus": 2,
       "torch_version": "2.13.0", "transformers_version": "5.0.0", "hostname": "ci-box"}
GPU = {"device": "cuda", "cpu_model": "Intel Xeon Platinum 8480+", "gpu_model": "NVIDIA H200",
       "n_cpus": 16, "torch_version": "2.13.0", "transformers_version": "5.0.0",
       "hostname": "gpu-node-3"}
SPEC = {"name": "quick", "pair": "micro", "prompts": "default", "objectives":
        {"speedup": "max", "tree_tokens_per_step": "min"}}
ERROR_MESSAGE = "ValueError: tree_shape [8, 8, 8] has 584 nodes, over node_budget 64"


@dataclass(frozen=True)
class Hardware:
    name: str
    spec: dict[str, Any]
    draft_cost: float  # drafter pass time / target pass time
    verify_cost_per_token: float  # extra target time per verified token
    ar_tokens_per_s: float


CPU_HW = Hardware("cpu", CPU, draft_cost=0.14, verify_cost_per_token=0.035, ar_tokens_per_s=152.0)
GPU_HW = Hardware("gpu", GPU, draft_cost=0.08, verify_cost_per_token=0.004, ar_tokens_per_s=41.0)

# (trial key, config) of the spec; acceptance per position is the method's.
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    *[(f"sps-k{k}", {"method": "sps", "draft_len": k}) for k in (1, 2, 3, 4, 6)],
    ("tree-2-1", {"method": "tree", "tree_shape": [2, 1], "node_budget": 8}),
    ("tree-3-2-1", {"method": "tree", "tree_shape": [3, 2, 1], "node_budget": 16}),
    ("tree-4-2-2-1", {"method": "tree", "tree_shape": [4, 2, 2, 1], "node_budget": 32}),
    ("pld-n2", {"method": "pld", "draft_len": 4, "ngram": 2}),
    ("pld-n3", {"method": "pld", "draft_len": 6, "ngram": 3}),
    ("layerskip-e2", {"method": "layerskip", "exit_layer": 2, "draft_len": 3}),
    ("typical-3-2", {"method": "typical", "tree_shape": [3, 2], "node_budget": 16}),
]
ACCEPTANCE = {"sps": 0.62, "tree": 0.66, "pld": 0.34, "layerskip": 0.55, "typical": 0.8}
N_PROMPTS = 4
NEW_TOKENS = 96


def _tree_nodes(shape: list[int]) -> int:
    nodes, width = 0, 1
    for branching in shape:
        width *= branching
        nodes += width
    return nodes


def typed(config: dict[str, Any]) -> DecodeConfig:
    """The seed's configuration as a trial carries it, with the knob columns filled as a method would."""
    shape = config.get("tree_shape")
    columns = KnobColumns(draft_len=config.get("draft_len"), node_budget=config.get("node_budget"),
                          tree_shape=json.dumps(shape, separators=(",", ":")) if shape else None)
    return DecodeConfig.from_dict(config, columns)


def metrics(config: dict[str, Any], hw: Hardware) -> DecodeResult:
    """What `spectune bench` would measure for ``config`` on ``hw``."""
    return DecodeResult.from_dict(bench_row(config, hw), typed(config))


def bench_row(config: dict[str, Any], hw: Hardware) -> dict[str, Any]:
    """A `spectune bench --json` row for ``config`` on ``hw``."""
    method = config["method"]
    a = ACCEPTANCE[method]
    shape = config.get("tree_shape")
    depth = len(shape) if shape else int(config["draft_len"])
    # A tree's extra siblings raise acceptance at each depth: 1 - (1 - a)^branching.
    per_position = ([round(1 - (1 - a) ** b, 4) for b in shape] if shape
                    else [round(a, 4)] * depth)
    reach, tau = 1.0, 1.0
    by_position = []
    for p in per_position:
        reach *= p
        tau += reach
        by_position.append(round(reach, 4))
    tree_tokens = (_tree_nodes(shape) if shape else depth) + 1
    draft_passes = 0.0 if method == "pld" else float(depth)
    draft_cost = hw.draft_cost * (0.5 if method == "layerskip" else 1.0) * draft_passes
    step_cost = 1.0 + draft_cost + hw.verify_cost_per_token * tree_tokens
    speedup = round(tau / step_cost, 4)
    tokens_per_s = hw.ar_tokens_per_s * speedup
    lossy = method == "typical"
    target_calls = round(NEW_TOKENS * N_PROMPTS / tau)
    return {
        "method": method, "config": config, "n_prompts": N_PROMPTS,
        "new_tokens": NEW_TOKENS * N_PROMPTS, "target_calls": target_calls,
        "draft_calls": int(draft_passes * target_calls),
        "mean_accepted_tokens": round(tau, 4),
        "acceptance_rate": round((tau - 1) / depth, 4), "acceptance_by_position": by_position,
        "tree_tokens_per_step": float(tree_tokens), "draft_calls_per_step": draft_passes,
        "wall_s": round(NEW_TOKENS * N_PROMPTS / tokens_per_s, 4), "wall_s_std": 0.01,
        "tokens_per_s": round(tokens_per_s, 2), "ar_tokens_per_s": hw.ar_tokens_per_s,
        "speedup": speedup, "speedup_std": 0.03, "speedups": [speedup - 0.02, speedup, speedup + 0.02],
        "lossless": False if lossy else True, "lossy_method": lossy, "mismatches": 2 if lossy else 0,
        "draft_share": round(draft_cost / step_cost, 4),
        "engine_overhead_share": 0.05, "ms_per_token": round(1000.0 / tokens_per_s, 4),
        "peak_mem_mb": 812.0 if hw.name == "gpu" else None,
        "acceptance_by_exit_layer": ({"1": 0.31, "2": 0.55, "3": 0.71}
                                     if method == "layerskip" else None),
        "temperature": 0.0, "max_new_tokens": NEW_TOKENS,
        "per_prompt": [
            {"prompt_id": f"code-{i:02d}", "category": "code", "new_tokens": NEW_TOKENS,
             "target_calls": round(NEW_TOKENS / tau), "mean_accepted_tokens": round(tau, 3),
             "wall_s": round(NEW_TOKENS / tokens_per_s, 4), "matches_ar": not (lossy and i < 2)}
            for i in range(N_PROMPTS)
        ],
    }


def seed_sweep(store: Store, name: str, hw: Hardware, running: bool) -> None:
    store.create_sweep(name, {**SPEC, "name": name}, who="tester", where=hw.spec["hostname"])
    store.set_sweep_status(name, "running")
    for key, config in CONFIGS:
        store.upsert_trial(name, key, typed(config), "running")
        store.record_result(name, key, metrics(config, hw), hw.spec)
    store.upsert_trial(name, "tree-8-8-8", typed({"method": "tree", "tree_shape": [8, 8, 8], "node_budget": 64}),
                       "running")
    store.record_error(name, "tree-8-8-8", ERROR_MESSAGE)
    store.upsert_trial(name, "sps-k8", typed({"method": "sps", "draft_len": 8}), "running" if running else "pending")
    if not running:
        store.set_sweep_status(name, "done")


def seed_store(url: str) -> Store:
    """Two sweeps in the store at ``url``; the open `Store` (caller closes it)."""
    store = connect(url)
    seed_sweep(store, "quick-cpu", CPU_HW, running=False)
    seed_sweep(store, "quick-gpu", GPU_HW, running=True)
    return store
