"""Our engine's AR on SmolLM2, eager against the compiled forward, in one process, interleaved prompt by prompt
(docs/benchmarks.md, "A compiled target forward").

    PYTHONPATH=. OMP_NUM_THREADS=T .venv/bin/python docs/compile_ar_probe.py DTYPE T [full|frozen|max-autotune|layers|parts]

full: the model's forward as `compile: default` compiles it; frozen: the same with inductor's freezing (weights as
constants, linear weights prepacked for oneDNN); max-autotune: as `compile: max-autotune` (freezing and inductor's
tuned matrix products, on CPUs its C++ GEMM templates); layers: each decoder block; parts: each block's MLP and norms. 4 chat prompts, 48 greedy tokens each, 3 rounds; prints ms per token and the speed ratio.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from spectune.engine.runner import CausalLM, compile_forward
from spectune.pair import load_pair
from spectune.pair_ref import PairRef
from spectune.prompts import load_prompts


def decode(lm: CausalLM, prompt: list[int], n: int = 48) -> tuple[list[int], float]:
    """Greedy AR: the tokens, and ms per token after the prefill."""
    lm.reset()
    logits = lm.forward(prompt, last_only=True)[-1]  # [V]
    out = []
    started = time.perf_counter()
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = lm.forward([out[-1]])[-1]  # [V]
    return out, (time.perf_counter() - started) / n * 1000


def main(dtype: str, threads: int, mode: str) -> None:
    torch.set_num_threads(threads)
    pair = load_pair(PairRef(target=os.path.expanduser("~/.cache/spectune/pairs/smollm2/target"), dtype=dtype))
    prompts = [pair.encode_prompt(p) for p in load_prompts("chat", limit=4)]
    model = pair.target
    eager_forward = model.forward
    if mode in ("full", "frozen", "max-autotune"):
        torch._inductor.config.freezing = mode == "frozen"
        compile_forward(model, "max-autotune" if mode == "max-autotune" else "default")
        swapped = [(model, eager_forward, model.forward)]
    else:
        blocks = list(model.model.layers)
        parts = blocks if mode == "layers" else [m for b in blocks for m in (b.mlp, b.input_layernorm,
                                                                              b.post_attention_layernorm)]
        swapped = [(m, m.forward, torch.compile(m.forward, dynamic=True)) for m in parts]

    def use(compiled: bool) -> None:
        for module, eager, fast in swapped:
            module.forward = fast if compiled else eager

    lm = CausalLM(model)
    use(False)
    reference = [decode(lm, p)[0] for p in prompts]
    use(True)
    started = time.perf_counter()
    for p in prompts:
        decode(lm, p)
    print(f"compile and first pass: {time.perf_counter() - started:.0f} s", flush=True)
    ms: dict[bool, list[float]] = {False: [], True: []}
    same = 0
    for round_ in range(3):
        for i, p in enumerate(prompts):
            for compiled in (False, True) if (round_ + i) % 2 == 0 else (True, False):
                use(compiled)
                tokens, per_token = decode(lm, p)
                ms[compiled].append(per_token)
                same += compiled and tokens == reference[i]
    ratios = sorted(e / c for e, c in zip(ms[False], ms[True]))
    print(f"{mode} {dtype} {threads}t: eager {statistics.median(ms[False]):.2f} ms/token, compiled "
          f"{statistics.median(ms[True]):.2f}; compiled speed over eager {statistics.median(ratios):.3f} "
          f"({ratios[0]:.3f}-{ratios[-1]:.3f}); compiled tokens equal eager's in {same}/{len(ms[True])} decodes")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "full")
