"""A vLLM sweep worker that dies is replaced like spectune's own (issue 23): the lease retires it and the
driver's pool keeper starts a fresh one, so the pool keeps its size. Real Ray, a real VllmWorker actor
(its environment check fails fast: no vLLM server starts, none is needed to prove the replacement)."""

from __future__ import annotations

import time

import pytest
import ray

from spectune.backends.vllm import VllmServerSettings
from spectune.pair_ref import PairRef
from spectune.workers.trials.pair_worker import PoolKeeper, wait_ready
from spectune.workers.vllm.worker import start_vllm_pool

pytestmark = pytest.mark.slow


def test_a_dead_vllm_worker_is_replaced_by_the_pool_keeper(micro_pair, ray_tmp, monkeypatch) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.setenv("SPECTUNE_VLLM_PYTHON", "/nonexistent/vllm/python")  # each worker starts in a second
    if ray.is_initialized():  # an earlier test's driver connection in this process: this test needs its own
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a cluster found
    try:
        pool = start_vllm_pool(PairRef(target=str(micro_pair / "target")), 1, 1.0, 0.0, VllmServerSettings())
        [first] = wait_ready(pool)
        assert "no vLLM environment" in first.error and first.node  # it reports where it runs
        with PoolKeeper(pool, poll_s=0.1) as keeper:
            ray.kill(pool.workers[0], no_restart=True)  # as if its process died
            started = time.monotonic()
            with pool.lease("trial-1") as leased:  # the dead one is retired, a fresh one handed out
                fresh = ray.get(leased.worker.ready.remote())
            assert keeper.replaced == 1 and time.monotonic() - started < 60
        assert fresh.worker_id != first.worker_id and len(pool.workers) == 1
        pool.stop()
    finally:
        ray.shutdown()
