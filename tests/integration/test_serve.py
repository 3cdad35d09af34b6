"""The live endpoint: in-process through FastAPI's TestClient (fast), then real HTTP against
`spectune serve` running Ray Serve on 127.0.0.1 (slow): greedy output equals AR, streaming,
every bad input, the API key, the `openai` package, a bounded load test and --stop."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from spectune.engine.loop import Decoder
from spectune.engine.sampling import Sampling
from spectune.methods import METHODS
from spectune.config import DecodeConfig
from spectune.pair import Pair, load_pair
from spectune.pair_ref import PairRef
from spectune.results import DecodeResult
from spectune.workers.serve.client import Delta, EndpointError, Finished, complete
from spectune.workers.serve.completion import SpectuneCompletionService
from spectune.workers.serve.text import TextDeltas
from spectune.workers.serve.openai_schema import CompletionRequest
from spectune.workers.serve.app import build_app
from spectune.workers.serve.served_config import (
    Limits, ServeArgs, ServeConfigError, choose, from_config_file,
)
from support import Served, alive, descendants, shut_down, spectune_serve

PROMPTS = [
    "def add(a, b):\n",
    "import os\nimport sys\n\n",
    "class Stack:\n    def __init__(self):\n",
    "for i in range(10):\n",
    "# Return the n-th Fibonacci number\ndef fib(n):\n",
    "with open(path) as f:\n",
    "    return self.",
    "if __name__ == '__main__':\n",
]
API_KEY = "test-key-123"
METHOD, KNOBS = "sps", {"draft_len": 4}


def ar_tokens(pair: Pair, prompt: str, max_tokens: int) -> list[int]:
    """The reference: plain greedy decoding of the prompt."""
    decoder = Decoder(pair.runners().target, METHODS.build("ar", {}, pair.runners()), pair.eos_token_id)
    return decoder.generate(pair.encode(prompt), max_tokens, Sampling(0.0, 1.0), 0).tokens


def write_config(folder: Path, pair_dir: Path, **over: Any) -> Path:
    path = folder / "served.yaml"
    path.write_text(yaml.safe_dump({"pair": str(pair_dir), "method": METHOD, "knobs": KNOBS, **over}))
    return path


def sse_events(lines: Iterator[str]) -> list[Any]:
    """The `data:` payloads of an SSE stream (JSON decoded; the final [DONE] kept as a string)."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list[Any]) -> str:
    return "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices"))


# --- in-process (fast) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(micro_pair: Path) -> Pair:
    return load_pair(PairRef.model_validate({"dir": micro_pair}))


@pytest.fixture(scope="module")
def service(pair: Pair, micro_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpectuneCompletionService]:
    served = from_config_file(str(write_config(tmp_path_factory.mktemp("served"), micro_pair)))
    svc = SpectuneCompletionService(pair, served, Limits(max_tokens_limit=300))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service: SpectuneCompletionService) -> TestClient:
    return TestClient(build_app(service))


@pytest.mark.parametrize("prompt", PROMPTS[:4])
def test_greedy_completion_equals_ar_decoding(client: TestClient, pair: Pair, prompt: str) -> None:
    reference = ar_tokens(pair, prompt, 40)
    answer = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 40, "temperature": 0})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == pair.decode(reference)
    assert body["choices"][0]["finish_reason"] == ("stop" if reference[-1] == pair.eos_token_id else "length")
    assert body["usage"] == {"prompt_tokens": len(pair.encode(prompt)), "completion_tokens": len(reference),
                             "total_tokens": len(pair.encode(prompt)) + len(reference)}
    stats = body["speculative"]
    assert (stats["method"], stats["config"], stats["trial_id"]) == (METHOD, KNOBS, None)
    assert 1 <= stats["target_calls"] <= len(reference)
    assert stats["mean_accepted_tokens"] == pytest.approx(len(reference) / stats["target_calls"])
    assert 0 <= stats["acceptance_rate"] <= 1 and stats["tokens_per_s"] > 0


def test_stream_sends_text_deltas_that_reassemble_to_the_completion(client: TestClient, pair: Pair) -> None:
    prompt = PROMPTS[0]
    whole = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 60, "temperature": 0}).json()
    request = {"prompt": prompt, "max_tokens": 60, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert len(chunks) > 2  # text arrives step by step, not in one piece
    assert streamed_text(events) == whole["choices"][0]["text"] == pair.decode(ar_tokens(pair, prompt, 60))
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert final["speculative"]["target_calls"] == whole["speculative"]["target_calls"]
    assert events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]  # include_usage


def test_compare_ar_reports_both_timings_and_the_speedup(client: TestClient) -> None:
    body = client.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 32, "temperature": 0,
                                                "compare_ar": True}).json()
    comparison = body["comparison"]
    assert comparison["outputs_match"] is True  # greedy + a lossless method
    assert comparison["ar_wall_s"] > 0 and comparison["ar_tokens_per_s"] > 0
    assert comparison["speculative_tokens_per_s"] == body["speculative"]["tokens_per_s"]
    assert comparison["speedup"] == pytest.approx(comparison["speculative_tokens_per_s"] / comparison["ar_tokens_per_s"])


def test_sampling_with_a_seed_is_reproducible(client: TestClient) -> None:
    request = {"prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    first, second = (client.post("/v1/completions", json=request).json() for _ in range(2))
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["speculative"]["seed"] == 7


BAD_REQUESTS = [
    pytest.param(b'{"prompt": "def f(', 400, "malformed JSON", None, id="malformed-json"),
    pytest.param(b"", 400, "no body", None, id="no-body"),
    pytest.param(b"[1, 2]", 400, "JSON object", None, id="not-an-object"),
    pytest.param(b'{"max_tokens": 8}', 400, "prompt is required", "prompt", id="missing-prompt"),
    pytest.param(b'{"prompt": "   "}', 400, "prompt is empty", "prompt", id="empty-prompt"),
    pytest.param(b'{"prompt": "x", "max_tokens": 100000}', 400, "at most 300", "max_tokens", id="max-tokens-over-limit"),
    pytest.param(b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens", "max_tokens", id="max-tokens-zero"),
    pytest.param(json.dumps({"prompt": "ab " * 1500, "max_tokens": 8}).encode(), 400, "longer than the model's context",
                 "prompt", id="prompt-longer-than-context"),
    pytest.param(json.dumps({"prompt": "ab " * 400, "max_tokens": 300}).encode(), 400, "max_tokens can be at most",
                 "max_tokens", id="prompt-plus-max-tokens-over-context"),
    pytest.param(b'{"prompt": "x", "temperature": 2.5}', 400, "temperature", "temperature", id="temperature-high"),
    pytest.param(b'{"prompt": "x", "temperature": -0.1}', 400, "temperature", "temperature", id="temperature-negative"),
    pytest.param(b'{"prompt": "x", "top_p": 0}', 400, "top_p", "top_p", id="top-p-zero"),
    pytest.param(b'{"prompt": "x", "top_p": 1.5}', 400, "top_p", "top_p", id="top-p-above-one"),
    pytest.param(b'{"prompt": "x", "best_of": 3}', 400, "unknown field 'best_of'", "best_of", id="unknown-field"),
    pytest.param(b'{"prompt": "x", "n": 2}', 400, "n:", "n", id="n-above-one"),
    pytest.param(b'{"prompt": "x", "model": "gpt-4"}', 404, "not served here", "model", id="unknown-model"),
]


@pytest.mark.parametrize("body, status, reason, param", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_the_reason_and_the_server_keeps_serving(
    client: TestClient, body: bytes, status: int, reason: str, param: str | None
) -> None:
    answer = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert reason in error["message"] and error["param"] == param
    assert "\n" not in error["message"]
    good = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4


def test_a_bad_streaming_request_is_refused_before_the_stream_starts(client: TestClient) -> None:
    answer = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10_000, "stream": True})
    assert answer.status_code == 400 and "at most 300" in answer.json()["error"]["message"]


def test_unknown_routes_and_methods_name_the_endpoints(client: TestClient) -> None:
    for answer in (client.get("/v1/chat/completions"), client.get("/v1/completions")):
        assert answer.status_code in (404, 405)
        assert "POST /v1/completions" in answer.json()["error"]["message"]


def test_models_healthz_and_config(client: TestClient, service: SpectuneCompletionService, micro_pair: Path) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [service.model_id]
    assert service.model_id == "micro-seed0/sps(draft_len=4)"
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["active_requests"] == 0
    config = client.get("/config").json()
    assert (config["method"], config["knobs"], config["lossless"]) == (METHOD, KNOBS, True)
    assert config["pair"]["target"] == str((micro_pair / "target").resolve())
    assert config["source"]["kind"] == "config_file" and config["source"]["path"].endswith("served.yaml")
    assert config["limits"]["max_tokens_limit"] == 300 and config["context"] == 1024
    named = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "model": service.model_id})
    assert named.status_code == 200 and named.json()["model"] == service.model_id


def test_api_key_is_required_when_configured(service: SpectuneCompletionService) -> None:
    guarded = TestClient(build_app(service, api_key=API_KEY))
    request = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        refused = guarded.post("/v1/completions", json=request, headers=headers)
        assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
        assert refused.headers["www-authenticate"] == "Bearer"
        assert guarded.get("/v1/models", headers=headers).status_code == 401
    # The key is checked before the body is read: a bad body without a key is still a 401.
    assert guarded.post("/v1/completions", content=b"{oops").status_code == 401
    allowed = {"Authorization": f"Bearer {API_KEY}"}
    assert guarded.post("/v1/completions", json=request, headers=allowed).status_code == 200
    assert guarded.get("/config", headers=allowed).status_code == 200
    assert guarded.get("/healthz").status_code == 200  # probes need no key


def test_a_stream_the_client_abandons_stops_decoding(service: SpectuneCompletionService) -> None:
    """Closing the stream after the first chunk frees the work: the decode stops within a step."""
    request = CompletionRequest(prompt=PROMPTS[0], max_tokens=300, temperature=0, stream=True)

    async def first_chunk_then_leave() -> None:
        chunks = service.stream(request, service.prepare(request))
        await anext(chunks)
        await chunks.aclose()

    before = service.health()["cancelled_requests"]
    asyncio.run(first_chunk_then_leave())
    deadline = time.monotonic() + 10
    while service.health()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.01)
    health = service.health()
    assert health["active_requests"] == 0
    assert health["cancelled_requests"] == before + 1  # stopped early, not run to max_tokens


def test_a_request_cancelled_mid_decode_stops_decoding(service: SpectuneCompletionService) -> None:
    """Serve cancels the handler of a client that hung up; the decode thread stops after its step."""
    request = CompletionRequest(prompt=PROMPTS[0], max_tokens=300, temperature=0)

    async def start_then_cancel() -> None:
        task = asyncio.create_task(service.complete(request))
        while service.health()["active_requests"] == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    before = service.health()["cancelled_requests"]
    asyncio.run(start_then_cancel())
    deadline = time.monotonic() + 10
    while service.health()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.health()["active_requests"] == 0
    assert service.health()["cancelled_requests"] == before + 1


def test_text_deltas_hold_back_a_split_character() -> None:
    text = "é"
    raw = text.encode()  # two bytes: a byte-level tokenizer may emit them as two tokens

    def decode(tokens: list[int]) -> str:
        return bytes(tokens).decode(errors="replace")

    deltas = TextDeltas(decode)
    assert deltas.add([raw[0]]) == ""  # half a character: nothing yet
    assert deltas.add([raw[1]]) == text
    assert deltas.add(list(b"ab")) == "ab" and deltas.flush() == ""


# --- choosing what to serve (fast) -------------------------------------------------------


def test_config_file_errors_name_the_problem(tmp_path: Path, micro_pair: Path) -> None:
    def problem(**content: Any) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(content))
        with pytest.raises(ServeConfigError) as err:
            from_config_file(str(path))
        return str(err.value)

    with pytest.raises(ServeConfigError, match="does not exist"):
        from_config_file(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("pair: [unclosed")
    with pytest.raises(ServeConfigError, match="not valid YAML"):
        from_config_file(str(tmp_path / "bad.yaml"))
    assert "unknown method 'nope'" in problem(pair=str(micro_pair), method="nope")
    assert "draft_len" in problem(pair=str(micro_pair), method="sps", knobs={"draft_len": 0})
    assert "pair: Field required" in problem(method="sps")
    assert "has no target/" in problem(pair=str(tmp_path), method="sps")
    assert "needs a drafter" in problem(pair={"target": str(micro_pair / "target")}, method="sps")
    assert "extra" in problem(pair=str(micro_pair), method="sps", colour="red").lower()


def test_pair_forms_resolve_to_absolute_model_paths(micro_pair: Path) -> None:
    expected = (str((micro_pair / "target").resolve()), str((micro_pair / "drafter").resolve()))
    for form in (str(micro_pair), {"dir": str(micro_pair)}, {"path": str(micro_pair)},
                 {"target": str(micro_pair / "target"), "drafter": str(micro_pair / "drafter")},
                 # a sweep spec as the launcher stores it (`SweepSpec.model_dump`)
                 {"dir": None, "target": str(micro_pair / "target"), "drafter": str(micro_pair / "drafter"),
                  "device": "cpu", "dtype": "float32"},
                 {"dir": str(micro_pair), "target": f"{micro_pair}/target", "drafter": f"{micro_pair}/drafter",
                  "device": "cpu", "dtype": "float32"}):
        ref = PairRef.model_validate(form).absolute()
        assert (ref.target, ref.drafter) == expected
    assert PairRef.model_validate({"dir": str(micro_pair), "device": "cpu"}).device == "cpu"
    assert PairRef.model_validate({"target": "Qwen/Qwen2.5-7B-Instruct",
                                   "drafter": "Qwen/Qwen2.5-0.5B-Instruct"}).absolute().target \
        == "Qwen/Qwen2.5-7B-Instruct"  # hub ids stay as they are


@pytest.fixture
def sweep_store(tmp_path: Path, micro_pair: Path) -> Iterator[tuple[str, dict[str, int]]]:
    """A real SQLite store with one finished sweep: the fastest trial is lossy, so it is not served."""
    from spectune.store.db import connect

    url = f"sqlite:///{tmp_path / 'store.db'}"
    spec = {"pair": {"dir": str(micro_pair)}, "objectives": [{"metric": "speedup", "mode": "max"},
                                                              {"metric": "tree_tokens_per_step", "mode": "min"}]}
    with connect(url) as store:
        store.create_sweep("quick", spec)
        ids = {}
        for key, config, speedup, cost, lossless in (
            ("a", {"method": "sps", "draft_len": 2, "temperature": 0.0}, 1.2, 3.0, True),
            ("b", {"method": "sps", "draft_len": 6}, 1.5, 7.0, True),
            ("c", {"method": "pld", "max_ngram": 3}, 1.9, 5.0, False),
            ("d", {"method": "sps", "knobs": {"draft_len": 3}}, 1.1, 2.0, True),
        ):
            typed = DecodeConfig.from_dict(config)
            store.upsert_trial("quick", key, typed, "running")
            ids[key] = store.record_result("quick", key, DecodeResult.from_dict(_metrics(config, speedup, cost, lossless),
                                                                                typed), _HARDWARE)
        yield url, ids


_HARDWARE = {"device": "cpu", "cpu_model": "test", "gpu_model": None, "n_cpus": 2, "torch_version": "2",
             "transformers_version": "5", "hostname": "box"}


def _metrics(config: dict[str, Any], speedup: float, cost: float, lossless: bool | None) -> dict[str, Any]:
    return {"method": config["method"], "config": config, "n_prompts": 2, "new_tokens": 64, "target_calls": 30,
            "draft_calls": 60, "mean_accepted_tokens": 2.1, "acceptance_rate": 0.5, "speedup": speedup,
            "tokens_per_s": 100 * speedup, "ar_tokens_per_s": 100.0, "tree_tokens_per_step": cost,
            "lossless": lossless, "lossy_method": False, "mismatches": 0 if lossless else 2}


def test_best_lossless_trial_of_a_sweep_by_objective(sweep_store: tuple[str, dict[str, int]], micro_pair: Path) -> None:
    url, ids = sweep_store
    best = choose(ServeArgs(sweep="quick", objective="speedup", db=url))
    assert (best.method, best.knobs, best.source.trial_id) == ("sps", {"draft_len": 6}, ids["b"])  # c is not lossless
    assert best.source.kind == "best_of_sweep" and best.source.mode == "max"
    assert best.pair.target == str((micro_pair / "target").resolve())
    assert best.trial_metrics["speedup"] == 1.5
    cheapest = choose(ServeArgs(sweep="quick", objective="tree_tokens_per_step", db=url))  # the spec says min
    assert (cheapest.knobs, cheapest.source.mode) == ({"draft_len": 3}, "min")  # knobs nested under `knobs:`
    assert choose(ServeArgs(sweep="quick", objective="tree_tokens_per_step", mode="max", db=url)).knobs == {"draft_len": 6}
    chosen = choose(ServeArgs(trial=ids["a"], db=url))
    assert (chosen.knobs, chosen.source.kind) == ({"draft_len": 2}, "trial")  # the temperature is not a knob


def test_an_unchecked_sampling_trial_is_served_only_when_asked(tmp_path: Path, micro_pair: Path) -> None:
    from spectune.store.db import connect

    url = f"sqlite:///{tmp_path / 'sampled.db'}"
    config = {"method": "sps", "draft_len": 4, "temperature": 0.7}
    with connect(url) as store:
        store.create_sweep("hot", {"pair": {"dir": str(micro_pair)}})
        typed = DecodeConfig.from_dict(config)
        sampled = store.record_result("hot", "t", DecodeResult.from_dict(_metrics(config, 1.4, 5.0, None), typed),
                                      _HARDWARE)
    with pytest.raises(ServeConfigError, match="lossless by rule but unchecked: --include-unchecked serves them"):
        choose(ServeArgs(sweep="hot", db=url))
    served = choose(ServeArgs(sweep="hot", db=url, include_unchecked=True))
    assert served.source.trial_id == sampled and served.knobs == {"draft_len": 4}


def test_the_trial_marked_in_the_dashboard_is_served_when_none_is_named(sweep_store: tuple[str, dict[str, int]]) -> None:
    from spectune.store.db import connect

    url, ids = sweep_store
    with pytest.raises(ServeConfigError, match="nothing to serve.*dashboard"):
        choose(ServeArgs(db=url))
    with connect(url) as store:
        store.mark_served(ids["d"])
    marked = choose(ServeArgs(db=url))
    assert (marked.source.kind, marked.source.trial_id, marked.knobs) == ("marked_in_dashboard", ids["d"], {"draft_len": 3})


def test_store_choices_fail_with_a_clear_reason(sweep_store: tuple[str, dict[str, int]], tmp_path: Path) -> None:
    url, _ = sweep_store
    with pytest.raises(ServeConfigError, match="no sweep named 'nope'"):
        choose(ServeArgs(sweep="nope", db=url))
    with pytest.raises(ServeConfigError, match="unknown objective 'speed'"):
        choose(ServeArgs(sweep="quick", objective="speed", db=url))
    with pytest.raises(ServeConfigError, match="no trial with id 999"):
        choose(ServeArgs(trial=999, db=url))
    with pytest.raises(ServeConfigError, match="no finished lossless trial"):
        choose(ServeArgs(sweep="quick", objective="peak_mem_mb", db=url))
    with pytest.raises(ValueError, match="not config and trial"):
        ServeArgs(config="x.yaml", trial=1)


def test_cli_reports_bad_choices_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spectune.cli import app

    monkeypatch.setenv("SPECTUNE_CACHE", str(tmp_path))
    runner = CliRunner()
    missing = runner.invoke(app, ["serve", "--config", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    both = runner.invoke(app, ["serve", "--config", "a.yaml", "--trial", "3"])
    assert both.exit_code == 2 and "choose one of config, trial or sweep" in both.output
    nothing = runner.invoke(app, ["serve", "--stop"])
    assert nothing.exit_code == 2 and "no `spectune serve` is running" in nothing.output


def test_serve_config_file_is_a_valid_serve_build_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(Path("workers/serve/serve_config.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "spectune.workers.serve.app:app_builder"
    args = ServeArgs.model_validate(application.args)
    assert args.sweep == "quick" and config.http_options.host == "127.0.0.1"
    (deployment,) = application.deployments
    assert deployment.name == "SpectuneCompletions" and deployment.autoscaling_config["max_replicas"] >= 1
    example = yaml.safe_load(Path("workers/serve/serve_example.yaml").read_text())
    assert {"pair", "method", "knobs"} <= set(example)


def test_deployment_options_come_from_flags_and_the_builder_reads_serve_args(micro_pair: Path, tmp_path: Path) -> None:
    from spectune.workers.serve.app import app_builder, bind

    served = from_config_file(str(write_config(tmp_path, micro_pair)))
    # Ray has no public accessor for an Application's deployment: read the bound one.
    fixed = bind(served, Limits(), None, replicas=3, num_cpus=2, num_gpus=0.5)._bound_deployment
    assert (fixed.num_replicas, fixed.ray_actor_options) == (3, {"num_cpus": 2, "num_gpus": 0.5})
    scaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}
    scaled = bind(served, Limits(), None, autoscaling=scaling)._bound_deployment
    assert scaled._deployment_config.autoscaling_config.max_replicas == 4
    built = app_builder({"config": str(tmp_path / "served.yaml"), "max_tokens_limit": 64,
                         "api_key": API_KEY})._bound_deployment
    served_arg, limits_arg, key_arg = built.init_args
    assert served_arg["method"] == METHOD and limits_arg["max_tokens_limit"] == 64 and key_arg == API_KEY
    with pytest.raises(ValueError, match="extra"):
        app_builder({"config": "x.yaml", "replicas": 2})  # replicas belong in `deployments:`


# --- real HTTP against Ray Serve (slow) ---------------------------------------------------


class Endpoint(Served):
    """A `spectune serve` process whose endpoint wants the test's API key."""

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def stop(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_spectune(), "serve", "--stop", "--port", str(self.port)], env=self.env,
                              capture_output=True, text=True, timeout=120)


def _spectune() -> str:
    return str(Path(sys.executable).with_name("spectune"))


@pytest.fixture(scope="module")
def endpoint(micro_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """`spectune serve` in its own process: a fresh local Ray, Serve on 127.0.0.1:<free port>."""
    folder = tmp_path_factory.mktemp("endpoint")
    served = spectune_serve(write_config(folder, micro_pair), folder, "--max-tokens-limit", "900", "--num-cpus", "1",
                            api_key=API_KEY, healthy_within_s=300)
    started = Endpoint(served.url, served.port, served.process, served.log, served.env)
    try:
        yield started
    finally:
        shut_down(started)


@pytest.fixture(scope="module")
def references(pair: Pair) -> dict[str, str]:
    """AR greedy text of every test prompt, 32 new tokens."""
    return {prompt: pair.decode(ar_tokens(pair, prompt, 32)) for prompt in PROMPTS}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_greedy_completions_and_streams_equal_ar(endpoint: Endpoint, references: dict[str, str]) -> None:
    with httpx.Client(base_url=endpoint.url, headers=endpoint.headers(), timeout=60) as http:
        for prompt in PROMPTS[:3]:
            body = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 32, "temperature": 0}).json()
            assert body["choices"][0]["text"] == references[prompt]
            assert body["speculative"]["method"] == METHOD and body["speculative"]["target_calls"] >= 1
            with http.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 32, "temperature": 0,
                                                              "stream": True}) as response:
                events = sse_events(response.iter_lines())
            assert events[-1] == "[DONE]" and streamed_text(events) == references[prompt]
            assert len([e for e in events if isinstance(e, dict)]) > 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_bad_inputs_get_4xx_and_the_server_keeps_serving(endpoint: Endpoint, references: dict[str, str]) -> None:
    bad = [(p.values[0], p.values[1], p.values[2].replace("at most 300", "at most 900")) for p in BAD_REQUESTS]
    good = {"prompt": PROMPTS[0], "max_tokens": 32, "temperature": 0}
    with httpx.Client(base_url=endpoint.url, headers=endpoint.headers(), timeout=60) as http:
        for body, status, reason in bad:
            answer = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert answer.status_code == status and reason in answer.json()["error"]["message"], (body[:60], answer.text)
            assert http.post("/v1/completions", json=good).json()["choices"][0]["text"] == references[PROMPTS[0]]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_api_key_models_healthz_and_config(endpoint: Endpoint) -> None:
    refused = httpx.post(f"{endpoint.url}/v1/completions", json={"prompt": "x"}, timeout=30)
    assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
    assert httpx.get(f"{endpoint.url}/healthz", timeout=30).json()["status"] == "ok"
    with httpx.Client(base_url=endpoint.url, headers=endpoint.headers(), timeout=30) as http:
        (model,) = http.get("/v1/models").json()["data"]
        config = http.get("/config").json()
    assert model["id"] == config["model"] == "micro-seed0/sps(draft_len=4)"
    assert config["source"]["kind"] == "config_file" and config["limits"]["max_tokens_limit"] == 900


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_openai_package_talks_to_the_endpoint(endpoint: Endpoint, references: dict[str, str]) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key=API_KEY, timeout=60, max_retries=0)
    (model,) = [m.id for m in client.models.list()]
    prompt = PROMPTS[4]
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0)
    assert completion.choices[0].text == references[prompt]
    assert completion.usage.completion_tokens == 32 or completion.choices[0].finish_reason == "stop"
    assert completion.model_extra["speculative"]["method"] == METHOD
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == references[prompt]
    compared = client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0,
                                         extra_body={"compare_ar": True})
    assert compared.model_extra["comparison"]["outputs_match"] is True
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=3.0)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_client_helper_streams_and_compares(endpoint: Endpoint, references: dict[str, str]) -> None:
    prompt = PROMPTS[5]
    events = list(complete(endpoint.url, prompt, max_tokens=32, compare_ar=True, api_key=API_KEY))
    deltas, final = events[:-1], events[-1]
    assert deltas and all(isinstance(e, Delta) for e in deltas) and isinstance(final, Finished)
    assert final.text == "".join(d.text for d in deltas) == references[prompt]
    assert final.comparison is not None and final.comparison.outputs_match and final.usage is not None
    (whole,) = complete(endpoint.url, prompt, max_tokens=32, stream=False, api_key=API_KEY)
    assert whole.text == references[prompt] and whole.speculative.method == METHOD
    with pytest.raises(EndpointError, match="HTTP 400: max_tokens is 5000"):
        list(complete(endpoint.url, prompt, max_tokens=5000, api_key=API_KEY))
    with pytest.raises(EndpointError, match="HTTP 401"):
        list(complete(endpoint.url, prompt))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_client_that_disconnects_mid_stream_frees_its_work(endpoint: Endpoint) -> None:
    with httpx.Client(base_url=endpoint.url, headers=endpoint.headers(), timeout=60) as http:
        before = http.get("/healthz").json()["cancelled_requests"]
        request = {"prompt": PROMPTS[0], "max_tokens": 900, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=request) as response:
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] is not None
        deadline = time.monotonic() + 30
        while (health := http.get("/healthz").json())["active_requests"] and time.monotonic() < deadline:
            time.sleep(0.1)
    assert health["active_requests"] == 0
    assert health["cancelled_requests"] == before + 1  # stopped early, not decoded to 900 tokens


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_load_16_concurrent_clients_64_requests_all_correct(endpoint: Endpoint,
                                                                  references: dict[str, str]) -> None:
    jobs = [(i, PROMPTS[i % len(PROMPTS)]) for i in range(64)]

    def ask(job: tuple[int, str]) -> bool:
        index, prompt = job
        if index % 2:  # half streamed, half in one piece
            *_, final = complete(endpoint.url, prompt, max_tokens=32, api_key=API_KEY, timeout_s=300)
            return final.text == references[prompt]
        body = httpx.post(f"{endpoint.url}/v1/completions", headers=endpoint.headers(), timeout=300,
                          json={"prompt": prompt, "max_tokens": 32, "temperature": 0}).json()
        return body["choices"][0]["text"] == references[prompt]

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(ask, job) for job in jobs]
        done, pending = wait(futures, timeout=600)
    assert not pending, f"{len(pending)} of 64 requests unanswered after {time.monotonic() - started:.0f} s"
    assert all(f.result() for f in done)


MALFORMED = [  # (body, expected status): every one a 4xx, never a 5xx
    (b"{oops", 400), (b"", 400), (b"[1, 2]", 400), (b'{"prompt": 5}', 400),
    (json.dumps({"prompt": "x", "seed": 2**64}).encode(), 400),
    (json.dumps({"prompt": "x", "max_tokens": -1}).encode(), 400),
    (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400),
    (json.dumps({"prompt": "x", "best_of": 2}).encode(), 400),
    (json.dumps({"prompt": "x", "top_p": 0}).encode(), 400),
    (json.dumps({"prompt": "x", "model": "nope"}).encode(), 404),
    (json.dumps({"prompt": "x", "max_tokens": 100_000, "stream": True}).encode(), 400),
    (json.dumps({"prompt": "x" * (1 << 20)}).encode(), 413),
]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_load_64_clients_a_quarter_malformed_no_5xx_and_every_answer_equal_to_ar(
        endpoint: Endpoint, references: dict[str, str]) -> None:
    """64 clients at once; every 4th sends a malformed request. No response is a 5xx, and every good
    answer (plain, streamed, or at a temperature below the greedy floor) equals AR's."""

    def ask(index: int) -> tuple[int, bool]:
        with httpx.Client(base_url=endpoint.url, headers=endpoint.headers(), timeout=300) as http:
            if index % 4 == 0:
                body, _ = MALFORMED[(index // 4) % len(MALFORMED)]
                answer = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
                return answer.status_code, answer.status_code == MALFORMED[(index // 4) % len(MALFORMED)][1]
            prompt = PROMPTS[index % len(PROMPTS)]
            request = {"prompt": prompt, "max_tokens": 32, "temperature": 1e-40 if index % 3 == 0 else 0}
            if index % 2:
                with http.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
                    events = sse_events(response.iter_lines())
                ok = events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)
                return response.status_code, ok and streamed_text(events) == references[prompt]
            answer = http.post("/v1/completions", json=request)
            return answer.status_code, answer.json()["choices"][0]["text"] == references[prompt]

    with ThreadPoolExecutor(max_workers=64) as pool:
        futures = [pool.submit(ask, i) for i in range(64)]
        done, pending = wait(futures, timeout=800)
    assert not pending, f"{len(pending)} of 64 requests unanswered"
    answers = [f.result() for f in done]
    assert not [status for status, _ in answers if status >= 500]
    assert all(ok for _, ok in answers)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_stop_shuts_the_endpoint_down(endpoint: Endpoint) -> None:
    children = descendants(endpoint.process.pid)  # the local Ray it started: raylet, GCS, Serve's actors, ...
    assert children
    stopped = endpoint.stop()  # SIGTERM to `spectune serve`
    assert stopped.returncode == 0, stopped.stderr + stopped.stdout
    assert "stopped the endpoint" in stopped.stdout
    assert endpoint.process.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)], "a process outlived `spectune serve`"
    assert not (Path(endpoint.env["SPECTUNE_CACHE"]) / "serve" / f"{endpoint.port}.json").exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{endpoint.url}/healthz", timeout=5)
