"""``infersim serve``: a serving simulation from the command line."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from simulator import dtypes
from simulator.errors import InferSimError


def add_serve_parser(sub: Any, add_model_hardware: Any) -> None:
    p = sub.add_parser("serve", help="simulate serving a request trace or arrival process: TTFT/TBT "
                                     "percentiles, throughput, goodput, power")
    _serve_flags(p, add_model_hardware)
    c = sub.add_parser("capacity", help="highest arrival rate meeting TTFT/TBT objectives "
                                        "(bisection over serve)")
    _serve_flags(c, add_model_hardware)
    c.add_argument("--attainment", type=float, default=0.9,
                   help="fraction of requests that must meet the objectives (default 0.9)")
    c.add_argument("--start-rate", type=float, default=1.0, help="first rate tried (default 1/s)")
    c.add_argument("--tolerance", type=float, default=0.05, help="relative precision (default 0.05)")


def _serve_flags(p: Any, add_model_hardware: Any) -> None:
    add_model_hardware(p)
    w = p.add_argument_group("workload (a trace, or arrivals at a rate)")
    w.add_argument("--trace", help="CSV with arrived_at, num_prefill_tokens, num_decode_tokens "
                                   "(e.g. ../shared/traces/azure-llm-inference-2023/splitwise_conv.csv)")
    w.add_argument("--max-requests", type=int, help="use the trace's first N requests")
    w.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply the trace's arrival times (2 halves its rate; default 1)")
    w.add_argument("--rate", type=float, help="requests per second (Poisson unless --arrival-cv)")
    w.add_argument("--requests", type=int, help="how many requests arrive at --rate")
    w.add_argument("--duration", type=float, help="or: requests arriving within this many seconds")
    w.add_argument("--arrival-cv", type=float, default=1.0,
                   help="coefficient of variation of the gaps (gamma arrivals; 1 = Poisson)")
    w.add_argument("--input-len", default="512",
                   help="prompt lengths: N, uniform:LO:HI, lognormal:MEDIAN:SIGMA or trace:PATH")
    w.add_argument("--output-len", default="128", help="output lengths, as --input-len")
    w.add_argument("--max-input-len", type=int, help="clip prompts to this many tokens")
    w.add_argument("--max-output-len", type=int, help="clip outputs to this many tokens")
    w.add_argument("--prefix-groups", type=int, default=0,
                   help="requests share one of this many prompt prefixes (system prompts)")
    w.add_argument("--prefix-tokens", type=int, default=0, help="length of a shared prefix")
    w.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("scheduler and KV cache")
    s.add_argument("--scheduler", default="continuous",
                   choices=("static", "continuous", "chunked", "decode-priority"))
    s.add_argument("--chunk-size", type=int, default=512, help="token budget per iteration (chunked)")
    s.add_argument("--max-batch", type=int, default=256, help="most sequences per iteration")
    s.add_argument("--max-batch-tokens", type=int, default=8192, help="most new tokens per iteration")
    s.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    s.add_argument("--preemption", default="recompute", choices=("recompute", "swap"))
    s.add_argument("--no-prefix-caching", action="store_true")
    s.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of device memory for weights, activations and KV (default 0.9)")
    s.add_argument("--step-overhead", type=float, default=0.0,
                   help="fixed seconds per iteration outside the model (scheduler, sampling glue)")
    m = p.add_argument_group("model precision and parallelism")
    m.add_argument("--weight-dtype", default="bf16", choices=dtypes.WEIGHT_DTYPES)
    m.add_argument("--kv-dtype", default=None, choices=dtypes.KV_DTYPES)
    m.add_argument("--act-dtype", default="bf16", choices=dtypes.ACT_DTYPES)
    m.add_argument("--attention", default="flash", choices=("flash", "naive"))
    m.add_argument("--tp", type=int, default=1)
    m.add_argument("--pp", type=int, default=1)
    m.add_argument("--dp", type=int, default=1, help="replicas (each of --tp x --pp devices)")
    m.add_argument("--micro-batches", type=int)
    m.add_argument("--overlap", default="none")
    m.add_argument("--router", default="least-tokens", choices=("round-robin", "least-tokens"))
    m.add_argument("--workers", type=int, default=1,
                   help="processes for the replicas under --router round-robin, which share nothing "
                        "(default 1; the same records either way)")
    sp = p.add_argument_group("speculative decoding (the draft on the target's devices)")
    sp.add_argument("--draft-model", help="draft model name or file, or 'self' with --draft-kv-budget")
    sp.add_argument("--draft-kv-budget", type=int, metavar="TOKENS")
    sp.add_argument("--spec-gamma", type=int, default=4, help="tokens drafted per round (default 4)")
    sp.add_argument("--spec-alpha", type=float, default=0.8, help="acceptance rate per drafted token")
    sp.add_argument("--spec-profile", metavar="A1,A2,...", help="acceptance per draft position")
    d = p.add_argument_group("prefill/decode disaggregation")
    d.add_argument("--prefill-hardware")
    d.add_argument("--decode-hardware")
    d.add_argument("--prefill-replicas", type=int, default=1)
    d.add_argument("--decode-replicas", type=int, default=1)
    d.add_argument("--kv-link", help="link name of the prefill system, or a bandwidth ('50 GB/s')")
    o = p.add_argument_group("objectives and output")
    o.add_argument("--slo-ttft", type=float, help="TTFT objective in seconds (goodput)")
    o.add_argument("--slo-tbt", type=float, help="worst token gap objective in seconds (goodput)")
    o.add_argument("--power-cap", type=float, help="per-device power cap in watts (lowers the clock)")
    o.add_argument("--power-budget", type=float,
                   help="provisioned watts for a cluster: how many such servers fit (POLCA)")
    o.add_argument("--server-overhead", type=float, default=0.0,
                   help="watts of a server beyond its accelerators (for --power-budget)")
    o.add_argument("--json", action="store_true")
    o.add_argument("--records-out", help="per-request records (.csv or .parquet)")
    o.add_argument("--iterations-out", help="per-iteration records (.csv or .parquet)")
    o.add_argument("--trace-out", help="Chrome/Perfetto trace JSON (open in ui.perfetto.dev)")
    o.add_argument("--plots", metavar="DIR", help="write latency CDFs and batch/KV/power timelines here")


def workload_from_args(args: argparse.Namespace):
    from simulator.engine.workload import clip_lengths, read_trace, synthetic

    if args.trace:
        if args.rate is not None or args.requests is not None or args.duration is not None:
            raise InferSimError("--trace brings its own arrivals: drop --rate/--requests/--duration "
                                "(use --time-scale to change its rate)")
        workload = read_trace(args.trace, args.max_requests, args.time_scale)
    else:
        if args.rate is None:
            raise InferSimError("give a workload: --trace FILE, or --rate QPS with --requests N "
                                "or --duration S")
        if args.requests is None and args.duration is None:
            raise InferSimError("--rate needs --requests N or --duration S")
        workload = synthetic(args.requests, args.rate, args.input_len, args.output_len, args.seed,
                             args.arrival_cv, args.duration, args.prefix_tokens, args.prefix_groups)
    if args.max_input_len or args.max_output_len:
        workload = clip_lengths(workload, args.max_input_len, args.max_output_len)
    return workload


def _run(args: argparse.Namespace, workload: Any):
    from simulator.engine.scheduler import SchedulerConfig
    from simulator.engine.serve import serve
    from simulator.strategies.parallel import ParallelPlan

    config = SchedulerConfig(policy=args.scheduler, max_batch=args.max_batch,
                             max_batch_tokens=args.max_batch_tokens, chunk_size=args.chunk_size,
                             block_size=args.block_size, preemption=args.preemption,
                             prefix_caching=not args.no_prefix_caching)
    speculative = None
    if args.draft_model:
        from simulator.strategies.speculative import Speculation, parse_profile

        speculative = Speculation(args.draft_model, args.spec_gamma, args.spec_alpha,
                                  parse_profile(args.spec_profile), None, args.draft_kv_budget)
    plan = None
    if (args.tp, args.pp, args.dp, args.micro_batches, args.overlap) != (1, 1, 1, None, "none"):
        plan = ParallelPlan(tp=args.tp, pp=args.pp, dp=args.dp, micro_batches=args.micro_batches,
                            overlap=args.overlap)
    return serve(args.model, args.hardware, workload, config, weight_dtype=args.weight_dtype,
                    kv_dtype=args.kv_dtype, act_dtype=args.act_dtype, attention=args.attention,
                    parallel=plan, router=args.router, prefill_hardware=args.prefill_hardware,
                    decode_hardware=args.decode_hardware, prefill_replicas=args.prefill_replicas,
                    decode_replicas=args.decode_replicas, kv_link=args.kv_link,
                    power_cap_w=args.power_cap, memory_fraction=args.memory_fraction,
                    step_overhead_s=args.step_overhead, speculative=speculative, seed=args.seed,
                    workers=getattr(args, "workers", 1))


def cmd_capacity(args: argparse.Namespace) -> int:
    from simulator.engine.capacity import capacity

    if args.trace:
        raise InferSimError("capacity draws arrivals at each rate it tries: give lengths with "
                            "--input-len/--output-len (trace:PATH samples a trace's lengths), not --trace")
    if args.requests is None and args.duration is None:
        args.requests = 500

    def serve_at(rate: float):
        args.rate = rate
        return _run(args, workload_from_args(args))

    wall = time.perf_counter()
    found = capacity(serve_at, args.slo_ttft, args.slo_tbt, args.attainment, args.start_rate, args.tolerance)
    result = {**found.to_dict(), "sim_wall_s": time.perf_counter() - wall}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from simulator.report.tables import console

    for p in found.probes:
        console.print(f"rate {p['rate']:.3g}/s: {p['attainment']:.1%} within the objectives")
    console.print(f"[bold]capacity: {found.rate:.3g} requests/s[/bold] ({found.attainment:.1%} of requests "
                  f"meet the objectives; target {found.target:.0%})")
    return 0


def run_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The records and the summary of ``infersim serve`` with these arguments."""
    wall = time.perf_counter()
    workload = workload_from_args(args)
    records = _run(args, workload)
    summary = records.summary(args.slo_ttft, args.slo_tbt)
    summary["sim_wall_s"] = time.perf_counter() - wall
    summary["iterations"] = records.meta["iterations"]
    summary["workload"] = workload.describe()
    return records, summary


def cmd_serve(args: argparse.Namespace) -> int:
    records, summary = run_from_args(args)
    if args.power_budget is not None:
        from simulator.engine.power import servers_under_budget
        from simulator.specs.loader import load_system

        device = load_system(args.hardware).device
        replicas = max(1, int(records.meta["replicas"]))
        summary["power_budget"] = servers_under_budget(
            args.power_budget, records.meta.get("devices_per_replica", 1), device.power.max, args.power_cap,
            summary["power_w"]["peak"] / replicas, args.server_overhead)
    for path, kind in ((args.records_out, "requests"), (args.iterations_out, "iterations")):
        if path:
            records.write(path, kind)
    if args.trace_out:
        records.write_chrome_trace(args.trace_out)
    if args.plots:
        from simulator.report.serve_plots import plot_serving

        written = plot_serving(records, args.plots, f"{args.model} on {args.hardware}")
        summary["plots"] = [str(p) for p in written]
    return print_summary(summary, args.json, f"{args.model} on {args.hardware}", args.scheduler)


def print_summary(summary: dict[str, Any], as_json: bool, title: str, scheduler: str) -> int:
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    from simulator.report.tables import console

    def pct(d: dict) -> str:
        return " / ".join("-" if d[k] is None else f"{d[k] * 1e3:.1f}" for k in ("p50", "p90", "p99"))

    console.print(f"[bold]{title}[/bold], {summary['workload']['requests']} "
                  f"requests ({summary['workload']['source']}), scheduler {scheduler}")
    console.print(f"completed {summary['completed']}  makespan {summary['makespan_s']:.1f} s  "
                  f"throughput {summary['throughput_tokens_per_s']:.1f} tok/s, "
                  f"{summary['throughput_requests_per_s']:.3f} req/s  goodput "
                  f"{summary['goodput_requests_per_s']:.3f} req/s")
    console.print(f"TTFT ms p50/p90/p99: {pct(summary['ttft_s'])}   TBT: {pct(summary['tbt_s'])}   "
                  f"E2E: {pct(summary['e2e_s'])}")
    energy = summary["energy_j_per_token"]
    console.print(f"preemptions {summary['preemptions']}  energy "
                  f"{'-' if energy is None else f'{energy:.3f}'} J/token  power mean "
                  f"{summary['power_w']['mean']:.0f} W, peak {summary['power_w']['peak']:.0f} W  "
                  f"({summary['iterations']} iterations simulated in {summary['sim_wall_s']:.2f} s)")
    return 0
