"""One vLLM OpenAI-compatible server process, run from the vLLM environment (`make vllm`).

    server = VllmServer.start(launch)      # a free port (or launch.port, checked first), waits for /health
    server.url, server.alive(), server.last_log_line(), server.stop()
    server.freeze(), server.thaw()         # SIGSTOP / SIGCONT to its processes: a frozen twin takes no CPU
    focus(server, servers)                 # that one thawed, every other frozen

A server that exits or is not healthy within the launch's timeout raises `ServerFailed` with
vLLM's own last error line from its log; a port that is taken is reported at once (never a
wait on a server that cannot bind). The process runs in a session of its own, so `stop` ends
vLLM's engine processes with it, and it is told to die with the process that started it. A frozen
server cannot act on that (a stopped process keeps SIGTERM pending), so the first freeze starts a
watchdog that thaws and ends the group when the starting process is gone.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# wrappers vLLM raises on top of the real reason (which an engine or worker process logged before)
GENERIC_FAILURES = ("Engine core initialization failed", "See root cause above", "See stack trace above",
                    "See stack trace for root cause", "initialization failed due to an exception")
ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b: ")
SKIP_IDLE_DRAFTS = "SPECTUNE_VLLM_SKIP_IDLE_DRAFTS"  # read by the plugin in each vLLM process
LOG_PREFIX = re.compile(r"^\(\w+ pid=\d+\)\s+(\w+\s+\d\d-\d\d\s+[\d:.]+\s+\[[^\]]*\]\s+)?")  # "(Worker pid=7) ERROR 12-01 23:26:43 [x.py:9] "


class ServerFailed(RuntimeError):
    """A vLLM server that did not start, or died; the message ends with vLLM's last error line."""


@dataclass(frozen=True)
class Launch:
    """Everything one server needs: the model, vLLM's speculative_config and engine arguments, where and how."""

    python: str  # the vLLM environment's interpreter
    model: str  # the target's folder (or hub id)
    speculative_config: dict[str, Any] | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)  # max_num_seqs, max_num_batched_tokens, ...
    max_model_len: int = 1024
    dtype: str = "auto"
    enforce_eager: bool = True
    threads: int = 1  # CPU: OMP threads of the engine
    kv_cache_gb: float = 1.0  # CPU: VLLM_CPU_KVCACHE_SPACE
    gpu: bool = False
    gpu_memory_utilization: float = 0.85
    intel_openmp: bool = True  # CPU: LD_PRELOAD the environment's libiomp5 (vLLM's advice for speculation)
    skip_idle_drafts: bool = True  # spectune's vLLM plugin (workers/vllm/plugin): no draft fetch after a k = 0 step
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free one
    served_name: str | None = None
    start_timeout_s: float = 300.0

    def command(self, port: int) -> list[str]:
        args = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--host", self.host, "--port", str(port), "--max-model-len", str(self.max_model_len),
                "--dtype", self.dtype, "--disable-uvicorn-access-log"]
        if self.served_name:
            args += ["--served-model-name", self.served_name]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.gpu:
            args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        for name, value in self.engine_args.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        if self.speculative_config is not None:
            args += ["--speculative-config", json.dumps(self.speculative_config)]
        return args

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("VIRTUAL_ENV", None)  # the project's venv is not vLLM's
        env[SKIP_IDLE_DRAFTS] = "1" if self.skip_idle_drafts else "0"
        if not self.gpu:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(self.kv_cache_gb)))
            env["OMP_NUM_THREADS"] = str(self.threads)
            iomp = Path(self.python).parent.parent / "lib" / "libiomp5.so"
            if self.intel_openmp and iomp.is_file():
                env["LD_PRELOAD"] = ":".join(p for p in (str(iomp), env.get("LD_PRELOAD", "")) if p)
        return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ServerFailed(f"port {port} on {host} is taken ({err.strerror}); the vLLM server cannot listen there") from None


def _die_with_parent() -> None:
    """In the child before exec: a new session (stop() signals the group), and SIGTERM when the starter
    dies (vLLM then shuts its engine processes down itself)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: stop() still ends the group


class VllmServer:
    def __init__(self, launch: Launch, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.launch = launch
        self.process = process
        self.port = port
        self.log = log
        self.started_s = 0.0
        self.frozen = False
        self.watchdog: subprocess.Popen[bytes] | None = None  # started by the first freeze

    @property
    def url(self) -> str:
        return f"http://{self.launch.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, launch: Launch) -> VllmServer:
        """Start the server and wait until it answers /health; ServerFailed (with vLLM's reason) otherwise."""
        if launch.port is not None:
            check_port_free(launch.host, launch.port)
        port = launch.port or free_port(launch.host)
        log = Path(tempfile.mkstemp(prefix=f"vllm-{port}-", suffix=".log")[1])
        with log.open("wb") as out:
            process = subprocess.Popen(launch.command(port), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=launch.environment(), preexec_fn=_die_with_parent)
        server = cls(launch, process, port, log)
        started = time.perf_counter()
        try:
            server._wait_healthy()
        except BaseException:
            server.stop()
            raise
        server.started_s = time.perf_counter() - started
        return server

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.launch.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(f"the vLLM server exited while starting (exit code {self.process.returncode}): "
                                   f"{self.last_log_line()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.5)
        raise ServerFailed(f"the vLLM server was not healthy within {self.launch.start_timeout_s:.0f} s: "
                           f"{self.last_log_line()}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def check_alive(self, grace_s: float = 0.0) -> None:
        """Raise if the server is gone. `grace_s`: after a failed request, give a dying server that long
        to finish exiting (its sockets close before the kernel reports its exit status)."""
        if grace_s > 0 and self.alive():
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                return  # still running: the request failed on its own
        if not self.alive():
            raise ServerFailed(f"the vLLM server died mid-trial (exit code {self.process.returncode}): "
                               f"{self.last_log_line()}")

    def last_log_line(self) -> str:
        return last_error_line(self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else "")

    def freeze(self) -> None:
        """SIGSTOP to the server's processes: while another server is measured this one takes no CPU at all
        (an idle vLLM beside the measured one made passes bimodal on 2 cores). Requests wait until `thaw`."""
        if self.frozen or not self.alive():
            return
        if self.watchdog is None:
            self.watchdog = _watchdog(os.getpid(), self.process.pid)
        _signal_group(self.process.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            _signal_group(self.process.pid, signal.SIGCONT)
            self.frozen = False

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the server's process group (its engine processes too), SIGKILL after `timeout_s`."""
        self.thaw()  # a stopped process would keep the SIGTERM pending
        if self.watchdog is not None:
            self.watchdog.kill()
            self.watchdog.wait()
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        _signal_group(self.process.pid, signal.SIGKILL)  # engine processes that outlived the server
        self.log.unlink(missing_ok=True)  # what it said that mattered is in the error already


def focus(server: VllmServer, servers: Iterable[VllmServer]) -> int:
    """`server` thawed and every other one of `servers` frozen, so the measured one has the CPU to itself;
    returns how many were frozen by this call."""
    frozen = 0
    for other in servers:
        if other is not server and not other.frozen:
            other.freeze()
            frozen += 1
    server.thaw()
    return frozen


# Run by `python -c` in a session of its own: waits for the starter's exit, then thaws and terminates the group.
WATCHDOG = """
import os, select, signal, sys
starter, group = int(sys.argv[1]), int(sys.argv[2])
try:
    select.select([os.pidfd_open(starter)], [], [])  # readable once the starter has exited
except ProcessLookupError:
    pass  # it exited before this ran
for sig in (signal.SIGCONT, signal.SIGTERM):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass
"""


def _watchdog(starter: int, group: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", WATCHDOG, str(starter), str(group)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def last_error_line(log: str) -> str:
    """vLLM's most telling line: the last `SomethingError: reason` that is not a generic wrapper, else the last line."""
    lines = [LOG_PREFIX.sub("", line.strip()) for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_LINE.search(line) and not any(g in line for g in GENERIC_FAILURES)]
    chosen = errors[-1] if errors else lines[-1] if lines else "(the server wrote no log)"
    return chosen[:500]
