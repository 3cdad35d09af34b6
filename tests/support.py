"""Small helpers shared by tests: random (untrained) Llama models of any vocabulary size; sweep specs
and store counts for the sweep tests."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def random_llama(seed: int, vocab: int = 16, layers: int = 2, hidden: int = 32, context: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper distributions than the default init, so drafts sometimes win
        model.lm_head.weight.mul_(8.0)
    return model


def sweep_spec(name: str, pair: Path, space: dict, **overrides) -> dict:
    """A small sweep spec on `pair` (2 prompts, 24 tokens, one repeat, one worker) as a dict."""
    return {
        "name": name,
        "pair": {"dir": str(pair)},
        "prompts": {"set": "default", "limit": 2},
        "max_new_tokens": 24,
        "space": space,
        "search": "grid",
        "repeats": 1,
        "warmup": 1,
        "concurrency": 1,
        "resources": {"cpus": 1, "gpus": 0},
        **overrides,
    }


def count(db: Path, sql: str) -> int:
    """One number from a SQLite store a sweep driver is writing (0 before it has created the tables)."""
    with sqlite3.connect(db, timeout=30) as conn:
        try:
            return conn.execute(sql).fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...), read from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
