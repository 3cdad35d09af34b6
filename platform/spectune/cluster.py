"""A Ray cluster of several nodes on this one machine, with token auth: `spectune cluster up / down`.

For trying the cluster path (`ray job submit`, trials spread over nodes, a node lost) on a laptop
before a real cluster. Each node is one `ray start --block` in a session of its own, so a node is
stopped (or killed, in the fault tests) by its process group: its raylet and every worker it
started, and nothing of any other Ray on the machine (`ray stop` would stop them all). Every port
is chosen free and the Ray folder is the cluster's own.

The head offers no CPUs (`num-cpus 0`): it runs the sweep driver only, as on a real cluster. Each
worker node offers `cpus` CPUs and a custom resource `spectune_node_<name>: 1`, so placement can
be directed at one node, and so a trial's node has a name (`node_name`).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

NODE_RESOURCE_PREFIX = "spectune_node_"  # + the node's name: "spectune_node_worker-1"
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"


class ClusterError(RuntimeError):
    """The local cluster cannot start or stop; the message says why in one line."""


@dataclass(frozen=True)
class NodeProcess:
    name: str  # "head", "worker-1", ...
    pid: int  # `ray start --block`, leader of the node's process group
    cpus: float
    log: str


@dataclass(frozen=True)
class LocalCluster:
    folder: str
    address: str  # the GCS, host:port (RAY_ADDRESS for drivers on this machine)
    dashboard: str  # http://host:port: the job API for `ray job submit --address`
    token_path: str
    nodes: tuple[NodeProcess, ...]

    def env(self) -> dict[str, str]:
        """What a client (a driver, `ray job submit`) needs in its environment to use this cluster."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path, "RAY_ADDRESS": self.address}

    def node(self, name: str) -> NodeProcess:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ClusterError(f"no node named {name!r}; the cluster has {', '.join(n.name for n in self.nodes)}")

    def save(self) -> None:
        state = {**asdict(self), "nodes": [asdict(n) for n in self.nodes]}
        Path(self.folder, STATE_FILE).write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, folder: Path) -> LocalCluster:
        path = folder / STATE_FILE
        if not path.is_file():
            raise ClusterError(f"no local cluster in {folder} (start one with `spectune cluster up`)")
        state = json.loads(path.read_text())
        return cls(**{**state, "nodes": tuple(NodeProcess(**n) for n in state["nodes"])})


def default_folder() -> Path:
    """Short on purpose: Ray's unix sockets live under it and their paths are limited to ~107 bytes."""
    return Path("/tmp") / f"spectune-cluster-{os.getuid()}"


def software() -> dict[str, str]:
    """What a node runs, to compare with the driver's (`mismatch`): spectune's version and a fingerprint of
    its code (an edited checkout keeps its version number), Ray's and Python's versions."""
    import hashlib
    import importlib.metadata
    import platform

    import ray

    import spectune

    digest = hashlib.sha1()
    for root in sorted({Path(p) for p in spectune.__path__} | _subpackage_dirs()):
        for path in sorted(root.rglob("*.py")):
            digest.update(path.read_bytes())
    return {"spectune": f"{importlib.metadata.version('spectune')}+{digest.hexdigest()[:10]}",
            "ray": ray.__version__, "python": platform.python_version()}


def _subpackage_dirs() -> set[Path]:
    """The folders of spectune's subpackages that live outside platform/spectune (workers, sweeps, dashboard)."""
    import importlib

    folders = set()
    for name in ("spectune.workers", "spectune.sweeps"):
        module = importlib.import_module(name)
        folders |= {Path(p) for p in module.__path__}
    return folders


def mismatch(driver: dict[str, str], node: dict[str, str], where: str) -> str | None:
    """One line naming what `where` runs differently from the driver, or None when they agree."""
    differ = [f"{name} {node.get(name, 'unknown')} (the driver: {version})" for name, version in driver.items()
              if node.get(name) != version]
    if not differ:
        return None
    return (f"{where} runs {', '.join(differ)}: install the same spectune, Ray and Python on every node "
            "(`pip install` of one commit) and restart it")


def node_name(resources: dict[str, float], fallback: str) -> str:
    """A node's name: its `spectune_node_<name>` resource when `cluster up` started it, else `fallback`."""
    for key in resources:
        if key.startswith(NODE_RESOURCE_PREFIX):
            return key.removeprefix(NODE_RESOURCE_PREFIX)
    return fallback


def free_ports(n: int) -> list[int]:
    probes = [socket.socket() for _ in range(n)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _node_args(name: str, cpus: float, temp_dir: Path) -> list[str]:
    """Every node has its own Ray folder: nodes sharing one would share `runtime_resources`, and a worker
    node's runtime-env agent would delete the job's unpacked --working-dir under the driver on the head."""
    node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = free_ports(6)
    resources = {} if name == "head" else {f"{NODE_RESOURCE_PREFIX}{name}": 1}
    return ["--block", "--disable-usage-stats", "--num-cpus", f"{cpus:g}", "--num-gpus", "0",
            "--resources", json.dumps(resources), "--temp-dir", str(temp_dir),
            "--node-ip-address", "127.0.0.1",
            "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
            "--min-worker-port", "0", "--max-worker-port", "0",  # the OS picks: nodes share this machine
            "--object-store-memory", str(200 * 1024 * 1024)]


def _start_node(name: str, args: list[str], folder: Path, env: dict[str, str], cpus: float,
                processes: list[subprocess.Popen]) -> NodeProcess:
    log = folder / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([_ray(), "start", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    processes.append(process)  # polled while starting: a node that exits fails `up` at once
    return NodeProcess(name, process.pid, cpus, str(log))


def up(nodes: int, cpus: float = 2.0, folder: Path | None = None, timeout_s: float = 180.0) -> LocalCluster:
    """A head (no CPUs) and `nodes` worker nodes of `cpus` CPUs each, started and all alive."""
    if nodes < 1:
        raise ClusterError(f"--nodes must be at least 1 (worker nodes besides the head), got {nodes}")
    folder = (folder or default_folder()).resolve()
    if (folder / STATE_FILE).exists():
        raise ClusterError(f"a local cluster is already up in {folder}; stop it with `spectune cluster down`")
    folder.mkdir(parents=True, exist_ok=True)
    token_path = folder / TOKEN_FILE
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    here = str(Path(sys.executable).parent)  # jobs run `spectune` and `python` of this installation
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
           "PATH": f"{here}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_AUTH_TOKEN", None)  # the file is the one token
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, client = free_ports(3)
    head_args = ["--head", "--port", str(gcs), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client)]
    processes: list[subprocess.Popen] = []
    started = [_start_node("head", [*head_args, *_node_args("head", 0, folder / "ray-head")], folder, env, 0, processes)]
    cluster = LocalCluster(str(folder), f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", str(token_path),
                           tuple(started))
    cluster.save()  # from here on `down` can stop what started, whatever fails next
    try:
        _wait_for_port(gcs, started[0], processes[0], timeout_s)
        for i in range(1, nodes + 1):
            name = f"worker-{i}"
            args = ["--address", cluster.address, *_node_args(name, cpus, folder / f"ray-{name}")]
            started.append(_start_node(name, args, folder, env, cpus, processes))
        cluster = LocalCluster(cluster.folder, cluster.address, cluster.dashboard, cluster.token_path, tuple(started))
        cluster.save()
        _wait_alive(cluster, processes, timeout_s)
    except BaseException:
        down(folder)
        raise
    return cluster


def add_node(folder: Path | None = None, cpus: float = 2.0, timeout_s: float = 180.0) -> NodeProcess:
    """One more worker node joining the running cluster in `folder` (named worker-N+1), alive when this returns.

    For trying what a real cluster does when a machine joins mid-sweep: the sweep's pool keeper
    starts workers on it, and new trials use them."""
    folder = (folder or default_folder()).resolve()
    cluster = LocalCluster.load(folder)
    env = {**os.environ, **cluster.env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    name = f"worker-{sum(n.name.startswith('worker-') for n in cluster.nodes) + 1}"
    processes: list[subprocess.Popen] = []
    args = ["--address", cluster.address, *_node_args(name, cpus, folder / f"ray-{name}")]
    node = _start_node(name, args, folder, env, cpus, processes)
    grown = LocalCluster(cluster.folder, cluster.address, cluster.dashboard, cluster.token_path, (*cluster.nodes, node))
    grown.save()  # `down` stops it too, whatever happens next
    deadline = time.monotonic() + timeout_s
    while name not in {n["name"] for n in alive_nodes(grown)}:
        if processes[0].poll() is not None:
            raise ClusterError(f"node {name} exited while starting; see {node.log}: {_tail(node.log)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"node {name} was not alive within {timeout_s:.0f} s; see {node.log}")
        time.sleep(1.0)
    return node


def _wait_for_port(port: int, head: NodeProcess, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        if process.poll() is not None:
            raise ClusterError(f"the head exited while starting; see {head.log}: {_tail(head.log)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"the head did not listen on port {port} within {timeout_s:.0f} s; see {head.log}")
        time.sleep(0.5)


def alive_nodes(cluster: LocalCluster) -> list[dict[str, Any]]:
    """The cluster's live nodes as Ray's GCS sees them (each: NodeID, name, CPU)."""
    output = subprocess.run([_ray(), "list", "nodes", "--address", cluster.dashboard, "--format", "json",
                             "--filter", "state=ALIVE"],
                            env={**os.environ, **cluster.env()}, capture_output=True, text=True, timeout=60)
    try:
        listed = json.loads(output.stdout) if output.returncode == 0 else []
    except json.JSONDecodeError:  # "No resource in the cluster" while the head is still starting
        return []
    return [{"node_id": n["node_id"], "name": node_name(n.get("resources_total") or {}, n["node_name"]),
             "cpus": (n.get("resources_total") or {}).get("CPU", 0.0)} for n in listed]


def _wait_alive(cluster: LocalCluster, processes: list[subprocess.Popen], timeout_s: float) -> None:
    deadline, count = time.monotonic() + timeout_s, len(cluster.nodes)
    while True:
        dead = [n for n, p in zip(cluster.nodes, processes) if p.poll() is not None]
        if dead:
            raise ClusterError(f"node {dead[0].name} exited while starting; see {dead[0].log}: {_tail(dead[0].log)}")
        if len(alive_nodes(cluster)) >= count:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"fewer than {count} nodes alive after {timeout_s:.0f} s; see the logs in {cluster.folder}")
        time.sleep(1.0)


def kill_node(cluster: LocalCluster, name: str) -> NodeProcess:
    """SIGKILL one node's whole process group (its raylet and its workers), as a machine lost would."""
    node = cluster.node(name)
    _signal_group(node.pid, signal.SIGKILL)
    return node


def down(folder: Path | None = None, grace_s: float = 10.0) -> list[str]:
    """Stop every node of the cluster in `folder` (its process groups only); the names stopped."""
    folder = (folder or default_folder()).resolve()
    cluster = LocalCluster.load(folder)
    for node in reversed(cluster.nodes):  # workers first, the head last
        _signal_group(node.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(_group_alive(n.pid) for n in cluster.nodes) and time.monotonic() < deadline:
        time.sleep(0.2)
    for node in cluster.nodes:
        _signal_group(node.pid, signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    while any(_group_alive(n.pid) for n in cluster.nodes) and time.monotonic() < deadline:
        time.sleep(0.2)
    (folder / STATE_FILE).unlink(missing_ok=True)
    return [n.name for n in cluster.nodes]


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _tail(log: str) -> str:
    try:
        lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""
