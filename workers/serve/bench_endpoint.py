"""Benchmark of the live endpoint: what HTTP + Ray Serve add, and throughput under concurrency.

    python -m spectune.workers.serve.bench_endpoint --config workers/serve/serve_example.yaml

1. Overhead: the same greedy requests, one at a time, (a) decoded in this process by
   `CompletionService.complete` (what a replica runs, without HTTP and Serve) and (b) sent over
   HTTP to a Serve replica. Also, per HTTP request, client latency minus the decode time the
   replica reports. Torch gets 1 thread here and the replica 1 CPU, so both decode alike.
2. Throughput: N requests from 1, 4, 16 concurrent clients; tokens/s, requests/s, latency.

It starts a local Ray + Serve on a free 127.0.0.1 port (or uses --url), prints a markdown
section for docs/benchmarks.md and, with --json, the raw numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Overhead:
    requests: int
    max_tokens: int
    in_process_ms: float  # median per request
    http_ms: float  # median per request, client side
    http_minus_decode_ms: float  # median of (client latency - replica's decode time)
    one_token_http_ms: float  # median latency of max_tokens=1 requests (fixed cost floor)
    one_token_in_process_ms: float


@dataclass(frozen=True)
class Throughput:
    clients: int
    requests: int
    wall_s: float
    tokens_per_s: float
    requests_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


def measure_overhead(service: Any, url: str, prompts: list[str], max_tokens: int, rounds: int) -> Overhead:
    from spectune.workers.serve.openai_schema import CompletionRequest

    async def in_process(prompt: str, tokens: int) -> float:
        started = time.perf_counter()
        await service.complete(CompletionRequest(**_body(prompt, tokens)))
        return time.perf_counter() - started

    local, remote, remote_minus_decode, local_one, remote_one = [], [], [], [], []
    with httpx.Client(base_url=url, timeout=300) as http:
        for _ in range(rounds):
            for prompt in prompts:  # interleaved, so drifting machine load hits both alike
                local.append(asyncio.run(in_process(prompt, max_tokens)))
                started = time.perf_counter()
                answer = http.post("/v1/completions", json=_body(prompt, max_tokens)).json()
                remote.append(time.perf_counter() - started)
                remote_minus_decode.append(remote[-1] - answer["speculative"]["wall_s"])
                local_one.append(asyncio.run(in_process(prompt, 1)))
                started = time.perf_counter()
                http.post("/v1/completions", json=_body(prompt, 1)).raise_for_status()
                remote_one.append(time.perf_counter() - started)
    ms = lambda values: 1000 * statistics.median(values)  # noqa: E731
    return Overhead(len(local), max_tokens, ms(local), ms(remote), ms(remote_minus_decode), ms(remote_one),
                    ms(local_one))


def measure_throughput(url: str, prompts: list[str], max_tokens: int, clients: int, requests: int) -> Throughput:
    def one(index: int) -> tuple[float, int]:
        started = time.perf_counter()
        answer = httpx.post(f"{url}/v1/completions", json=_body(prompts[index % len(prompts)], max_tokens), timeout=600)
        answer.raise_for_status()
        return time.perf_counter() - started, answer.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    latencies = [latency for latency, _ in results]
    return Throughput(clients, requests, wall, sum(tokens for _, tokens in results) / wall, requests / wall,
                      1000 * _percentile(latencies, 0.5), 1000 * _percentile(latencies, 0.95))


def markdown(command: str, model: str, overhead: Overhead, rows: list[Throughput], notes: str) -> str:
    lines = [
        "## Endpoint", "", f"Command: `{command}`", "", f"Served: `{model}`, greedy, {notes}", "",
        f"**Overhead** ({overhead.requests} requests one at a time, medians):", "",
        "| request | in-process `CompletionService` | HTTP + Ray Serve | HTTP latency - replica decode time |",
        "|---|---:|---:|---:|",
        f"| max_tokens={overhead.max_tokens} | {overhead.in_process_ms:.1f} ms | {overhead.http_ms:.1f} ms | "
        f"{overhead.http_minus_decode_ms:.1f} ms |",
        f"| max_tokens=1 | {overhead.one_token_in_process_ms:.1f} ms | {overhead.one_token_http_ms:.1f} ms | |",
        "", "**Throughput** (concurrent clients, each request waits for its whole answer):", "",
        "| clients | requests | wall s | tokens/s | requests/s | p50 latency | p95 latency |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r.clients} | {r.requests} | {r.wall_s:.1f} | {r.tokens_per_s:.0f} | {r.requests_per_s:.2f} | "
              f"{r.latency_p50_ms:.0f} ms | {r.latency_p95_ms:.0f} ms |" for r in rows]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="served config YAML (pair + method + knobs)")
    parser.add_argument("--url", help="benchmark this running endpoint instead of starting one (same --config!)")
    parser.add_argument("--prompts", type=int, default=8, help="first N prompts of the shipped set")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="overhead: passes over the prompts")
    parser.add_argument("--requests", type=int, default=32, help="throughput: requests per concurrency level")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="also print the raw numbers as JSON")
    args = parser.parse_args(argv)

    import torch

    from spectune.prompts import load_prompts
    from spectune.workers.serve.completion import SpectuneCompletionService
    from spectune.workers.serve.served_config import Limits, from_config_file

    torch.set_num_threads(1)  # as the replica (num_cpus=1)
    served = from_config_file(args.config)
    limits = Limits(max_tokens_limit=max(args.max_tokens, 1), decode_threads=args.decode_threads)
    prompts = [p.prompt for p in load_prompts("default", args.prompts)]
    service = SpectuneCompletionService.load(served, limits)
    url = args.url or _start_endpoint(served, limits, args.replicas)
    try:
        print(f"benchmarking {served.model_id} at {url}", file=sys.stderr)
        overhead = measure_overhead(service, url, prompts, args.max_tokens, args.rounds)
        rows = [measure_throughput(url, prompts, args.max_tokens, int(c), args.requests)
                for c in args.clients.split(",")]
    finally:
        service.close()
        if not args.url:
            _stop_endpoint()
    notes = (f"{args.max_tokens} new tokens per request, {len(prompts)} prompts of the shipped set, "
             f"{args.replicas} replica(s) x 1 CPU, decode_threads={args.decode_threads}")
    command = "python -m spectune.workers.serve.bench_endpoint " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(command, served.model_id, overhead, rows, notes))
    if args.json:
        print(json.dumps({"overhead": asdict(overhead), "throughput": [asdict(r) for r in rows]}, indent=2))


def _start_endpoint(served: Any, limits: Any, replicas: int) -> str:
    import ray

    from spectune.workers.serve.app import bind, deploy

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = _free_port()
    deploy(bind(served, limits, None, replicas=replicas, num_cpus=1), port=port)
    return f"http://127.0.0.1:{port}"


def _stop_endpoint() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
