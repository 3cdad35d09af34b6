"""Run by the vLLM environment's interpreter (tests/integration/test_heads_vllm.py): load the target with an
exported heads checkpoint as vLLM's speculative draft, decode greedily, print one JSON line.

    python vllm_heads_check.py TARGET METHOD HEADS K PROMPTS_JSON OUT_JSON

METHOD "none" decodes without speculation (the reference); "speculators" loads HEADS as the model itself (a
`speculators` checkpoint names its target and draft length; TARGET is unused). The result goes to OUT_JSON (vLLM's own
processes write to stdout too); on failure it carries vLLM's error.
"""

import json
import os
import sys
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    target, method, heads, k, prompts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
    out = sys.argv[6]
    from vllm import LLM, SamplingParams

    speculative = None if method in ("none", "speculators") else {"method": method, "model": heads,
                                                                  "num_speculative_tokens": k}
    model = heads if method == "speculators" else target
    try:
        llm = LLM(model=model, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                  speculative_config=speculative)
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
        used = llm.llm_engine.vllm_config.speculative_config
        result = {"ok": True, "tokens": [list(o.outputs[0].token_ids) for o in outs],
                  "prompt_tokens": [list(o.prompt_token_ids) for o in outs],
                  "speculative": None if used is None else {"method": used.method,
                                                            "num_speculative_tokens": used.num_speculative_tokens},
                  "verifier": llm.llm_engine.vllm_config.model_config.model}
    except Exception as err:  # noqa: BLE001 - the caller reports vLLM's own error
        result = {"ok": False, "error": traceback.format_exception_only(type(err), err)[-1].strip()}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running this
    main()
