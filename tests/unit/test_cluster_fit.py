"""A trial slot must fit on one node: the sweep refuses up front, naming the largest node, when none can
hold one (even where the cluster's total would), and counts slots node by node otherwise. Also how a
node is named and how a trial's node survives Tune's pickling of its error."""

from __future__ import annotations

import pickle

import pytest

from spectune.cluster import node_name
from spectune.sweeps.launcher import NodeCapacity, SweepFailed, slots_on, workers_that_fit
from spectune.sweeps.spec import parse_spec
from spectune.sweeps.trainable import TrialFailed

from support import sweep_spec

HEAD = NodeCapacity("head", 0.0, 0.0)
TWO_NODES = [HEAD, NodeCapacity("worker-1", 2.0, 0.0), NodeCapacity("worker-2", 3.0, 0.0)]


def spec(cpus: float, gpus: float = 0, concurrency: int = 8):
    return parse_spec(sweep_spec("fit", "/nonexistent/pair", {"pld": {}}, concurrency=concurrency,
                                 resources={"cpus": cpus, "gpus": gpus}))


def test_a_trial_bigger_than_every_node_is_refused_naming_the_largest_node() -> None:
    # 5 CPUs in all, but no node has 4: a slot cannot straddle two nodes
    with pytest.raises(SweepFailed, match=r"needs 4 CPUs and 0 GPUs on one node; the largest of the cluster's "
                                          r"3 node\(s\), worker-2, has 3 CPUs and 0 GPUs"):
        workers_that_fit(spec(4), TWO_NODES)


def test_a_gpu_trial_on_cpu_nodes_is_refused() -> None:
    with pytest.raises(SweepFailed, match="needs 1 CPUs and 1 GPUs on one node"):
        workers_that_fit(spec(1, 1), TWO_NODES)


def test_slots_are_counted_node_by_node() -> None:
    assert slots_on(TWO_NODES, 2, 0) == 2  # 1 + 1 (the 3-CPU node holds one 2-CPU slot, not 1.5)
    assert slots_on(TWO_NODES, 1, 0) == 5
    assert workers_that_fit(spec(1, concurrency=3), TWO_NODES) == 3
    gpu_nodes = [NodeCapacity("a", 8, 2), NodeCapacity("b", 2, 4)]
    assert slots_on(gpu_nodes, 2, 1) == 3  # a: min(4, 2); b: min(1, 4)


def test_a_node_is_named_by_its_spectune_resource_else_the_fallback() -> None:
    assert node_name({"CPU": 2.0, "spectune_node_worker-2": 1.0}, "10.0.0.5") == "worker-2"
    assert node_name({"CPU": 2.0}, "10.0.0.5") == "10.0.0.5"


def test_a_trial_failure_keeps_its_node_through_pickling() -> None:
    error = pickle.loads(pickle.dumps(TrialFailed("the worker died", "worker-2/abcd1234")))
    assert (str(error), error.node) == ("the worker died", "worker-2/abcd1234")


def test_a_node_running_other_code_is_named_with_what_differs() -> None:
    from spectune.cluster import mismatch, software

    here = software()
    assert set(here) == {"spectune", "ray", "python"} and "+" in here["spectune"]  # version + code fingerprint
    assert mismatch(here, dict(here), "node worker-1") is None
    other = {**here, "spectune": "0.0.9+0123456789"}
    problem = mismatch(here, other, "node worker-2/abcd1234")
    assert problem.startswith("node worker-2/abcd1234 runs spectune 0.0.9+0123456789 (the driver: ")
    assert "install the same spectune, Ray and Python on every node" in problem and "\n" not in problem
    assert "ray" not in problem.split("(the driver")[0].split("runs", 1)[1]  # only what differs is named
    missing = mismatch(here, {}, "node worker-3")  # a worker too old to report: every item named as unknown
    assert "spectune unknown" in missing and "ray unknown" in missing and "python unknown" in missing


def test_the_code_fingerprint_follows_the_source_not_just_the_version(tmp_path, monkeypatch) -> None:
    import spectune
    from spectune import cluster

    before = cluster.software()["spectune"]
    copy = tmp_path / "spectune"
    import shutil

    shutil.copytree(spectune.__path__[0], copy, ignore=shutil.ignore_patterns("__pycache__", "data"))
    (copy / "edited.py").write_text("X = 1\n")  # an edited checkout of the same version
    monkeypatch.setattr(spectune, "__path__", [str(copy)])
    after = cluster.software()["spectune"]
    assert before.split("+")[0] == after.split("+")[0] and before != after
