"""Simulator wall time of serving runs (the engine's hot path is one iteration's cost).

    python -m docs.bench_serve [--million] [--workers N]     (from the repository root)

1. 10,000 requests of the Azure conversation trace (first 10,000, lengths clipped to Llama-2-7B's
   4,096-token context) on one A100-80GB replica, each scheduler;
2. with ``--million``: 1,000,000 requests across 100 replicas (Poisson arrivals at 100 times
   one replica's sustainable rate, lengths sampled from the same trace), continuous batching,
   round-robin: the replicas run one after another, or in ``--workers`` forked processes
   (default: one per core).

Prints the machine, the load average before and after, wall time, iterations and time per
simulated iteration.
"""

from __future__ import annotations

import argparse
import os
import time

from docs.bench_estimate import cpu_model
from simulator.engine.scheduler import SchedulerConfig
from simulator.engine.serve import serve
from simulator.engine.workload import clip_lengths, read_trace, synthetic
from simulator.strategies.parallel import ParallelPlan

TRACE = "../shared/traces/azure-llm-inference-2023/splitwise_conv.csv"


def _row(label: str, run) -> None:
    start = time.perf_counter()
    records = run()
    wall = time.perf_counter() - start
    iterations = records.meta["iterations"]
    summary = records.summary()
    latency = f"{summary['ttft_s']['p50']:.3g} s / {summary['tbt_s']['p50'] * 1e3:.3g} ms"
    print(f"| {label} | {len(records.requests):,} | {iterations:,} | {wall:.2f} s | "
          f"{wall / iterations * 1e6:.0f} us | {latency} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--million", action="store_true", help="also 1,000,000 requests on 100 replicas")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for the 100 replicas (default: one per core)")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average before {os.getloadavg()}")
    print("| run | requests | iterations | wall | per iteration | TTFT p50 / TBT p50 |")
    print("|---|---|---|---|---|---|")
    trace = clip_lengths(read_trace(TRACE, max_requests=10_000), max_total=4096)
    for policy in ("continuous", "chunked", "decode-priority"):
        _row(f"conversation trace, llama-2-7b on one A100, {policy}",
             lambda p=policy: serve("llama-2-7b", "a100-80gb-sxm", trace, SchedulerConfig(policy=p)))
    if args.million:
        workload = clip_lengths(synthetic(1_000_000, 100 * 3.0, f"trace:{TRACE}", f"trace:{TRACE}", seed=0),
                                max_total=4096)
        _row(f"1,000,000 requests, llama-2-7b on 100 A100 replicas (round-robin router, "
             f"{args.workers} worker process{'es' if args.workers > 1 else ''})",
             lambda: serve("llama-2-7b", "dgx-a100", workload, parallel=ParallelPlan(dp=100),
                           router="round-robin", workers=args.workers))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
