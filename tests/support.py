"""Small helpers shared by tests: random (untrained) Llama and Bamba (hybrid SSM-attention) models; sweep specs
and store counts for the sweep tests; a real `spectune serve` in its own process (`spectune_serve`)."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from transformers import BambaConfig, BambaForCausalLM, LlamaConfig, LlamaForCausalLM


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


def random_bamba(seed: int, vocab: int = 32, hidden: int = 32, chunk: int = 4) -> BambaForCausalLM:
    """A random hybrid: layers SSM, attention, SSM (Mamba-2 mixers of 4 heads x 16, state 8, conv 4).
    A small `chunk` makes the chunked scan cross chunk boundaries even on short prompts."""
    torch.manual_seed(seed)
    config = BambaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=4,
        mamba_d_head=2 * hidden // 4, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=chunk, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )
    model = BambaForCausalLM(config).eval()
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


@dataclass
class Served:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]

    @property
    def model(self) -> str:
        return httpx.get(f"{self.url}/v1/models", timeout=30).json()["data"][0]["id"]

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=60, max_retries=0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spectune_serve(config: Path, folder: Path, *extra: str, api_key: str | None = None,
                   healthy_within_s: float = 360.0) -> Served:
    """`spectune serve --config` in its own process (a fresh local Ray), healthy; `api_key` as $SPECTUNE_API_KEY."""
    port = free_port()
    env = {**os.environ, "SPECTUNE_CACHE": str(folder / "cache"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("SPECTUNE_API_KEY", None)
    if api_key is not None:
        env["SPECTUNE_API_KEY"] = api_key
    log = folder / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(Path(sys.executable).with_name("spectune")), "serve", "--config", str(config),
                                    "--port", str(port), *extra], env=env, stdout=out, stderr=subprocess.STDOUT)
    served = Served(f"http://127.0.0.1:{port}", port, process, log, env)
    deadline = time.monotonic() + healthy_within_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"`spectune serve` exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{served.url}/healthz", timeout=5).status_code == 200:
                return served
        except httpx.HTTPError:
            pass
        time.sleep(1)
    shut_down(served)
    pytest.fail(f"the endpoint was not healthy within {healthy_within_s:.0f} s:\n{log.read_text()[-4000:]}")


@contextmanager
def serving(config: dict[str, Any], folder: Path, *extra: str) -> Iterator[Served]:
    """`spectune serve` of `config` (written to folder/served.yaml) with the `extra` options, stopped after."""
    path = folder / "served.yaml"
    path.write_text(yaml.safe_dump(config))
    started = spectune_serve(path, folder, *extra)
    try:
        yield started
    finally:
        shut_down(started)


def shut_down(served: Served) -> None:
    if served.process.poll() is None:
        subprocess.run([str(Path(sys.executable).with_name("spectune")), "serve", "--stop", "--port",
                        str(served.port)], env=served.env, capture_output=True, timeout=120)
    try:
        served.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        served.process.terminate()
        served.process.wait(timeout=30)


def shipped_prompt_ids(pair: Any) -> list[tuple[str, list[int]]]:
    """The shipped default prompts (at least 20), encoded by `pair`'s tokenizer: (id, token ids)."""
    from spectune.prompts import load_prompts

    chosen = load_prompts("default")
    assert len(chosen) >= 20
    return [(p.id, pair.encode(p.prompt)) for p in chosen]


def ar_references(pair: Any, prompts: list[tuple[str, list[int]]], max_new_tokens: int) -> dict[str, list[int]]:
    """Plain greedy decoding of each prompt by spectune's own AR: what every lossless method must equal."""
    from spectune.engine.loop import Decoder
    from spectune.methods import METHODS

    ar = Decoder(pair.runners().target, METHODS.build("ar", {}, pair.runners()), pair.eos_token_id)
    return {pid: ar.generate(ids, max_new_tokens).tokens for pid, ids in prompts}
