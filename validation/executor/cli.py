"""The ``infersim execute`` subcommand: run the reference executor and print its measurements.

    infersim execute --model tiny-dense-58m --batch 4 --input-len 256 --output-len 32 \\
        [--backend numpy|torch] [--device cpu|cuda] [--dtype float32] [--repeats 3] [--seed 0] [--json]
        [--tp N | --ep N | --pp N [--micro-batches M]] [--draft-model NAME --spec-gamma G --spec-alpha A]
        [--offload-weights disk=F [--no-prefetch]] [--kv-policy window|streaming|h2o --kv-budget N
        [--kv-sinks S]] [--kv-dtype int8|int4|int2 [--kv-residual R]] [--expert-cache F]

The ``infersim execute-serve`` subcommand: serve requests arriving on the wall clock with the
executor's real serving loop (``validation.executor.serve``) and print the run's summary::

    infersim execute-serve --model tiny-dense-58m [--rate QPS --requests N --input-len N|LO:HI
        --output-len N|LO:HI | --trace FILE [--max-requests N --time-scale F --length-scale F
        --max-input-len N --max-output-len N]] [--scheduler continuous|chunked] [--chunk-size N]
        [--max-batch N] [--max-batch-tokens N] [--kv-capacity-tokens N] [--seed N] [--json]
        [--records-out FILE.csv] [--iterations-out FILE.csv]

``simulator/cli.py`` wires them in with ``add_execute_parser(sub)`` / ``add_serve_parser(sub)``
and maps ``"execute"`` to ``cmd_execute``, ``"execute-serve"`` to ``cmd_execute_serve``. Bad
input raises ``InferSimError``, which the CLI prints as one line with exit code 2. The backend
(and the scheduler) are checked by the executor (not by argparse ``choices``) so the error is an
``InferSimError`` too.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from simulator.errors import InferSimError

DEFAULT_MODEL = "tiny-dense-58m"


def add_execute_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``execute`` to an ``argparse`` subparsers object; returns the new parser."""
    parser = subparsers.add_parser(
        "execute", help="run the reference executor (a real small transformer) and measure it",
        description="Run batched greedy generation with random weights on this machine and "
                    "report TTFT, TPOT, throughput, peak memory and dispatch overhead "
                    "(medians over repeats, after one warm-up).",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"shipped model name, or a YAML/config.json path (default {DEFAULT_MODEL})")
    parser.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per sequence (default 128)")
    parser.add_argument("--output-len", type=int, default=32,
                        help="generated tokens per sequence, the first from prefill (default 32)")
    parser.add_argument("--backend", default="numpy", help="numpy (default) or torch")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] (torch only)")
    parser.add_argument("--dtype", default="float32",
                        help="float32 (default); float16 or bfloat16 with the torch backend")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations (default 3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed generations first, the first also measures memory (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompt seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    group = parser.add_argument_group("strategies (the same flags as infersim estimate)")
    group.add_argument("--offload-weights", metavar="disk=F",
                       help="the last F of the layers (rounded to whole layers) on disk, read back every "
                            "step with the page cache dropped")
    group.add_argument("--no-prefetch", action="store_true",
                       help="read each offloaded layer when the step reaches it, not in a reader thread")
    group.add_argument("--kv-policy", default="full", choices=("full", "window", "streaming", "h2o"),
                       help="KV eviction in decode: keep a budget of recent tokens, sinks + recent "
                            "(StreamingLLM), or heavy hitters + recent (H2O)")
    group.add_argument("--kv-budget", type=float,
                       help="tokens kept per sequence (> 1) or a fraction of the sequence (<= 1)")
    group.add_argument("--kv-sinks", type=int, default=4,
                       help="attention sinks kept by --kv-policy streaming (default 4)")
    group.add_argument("--kv-dtype", choices=("int8", "int4", "int2"),
                       help="quantize the KV cache as KIVI does (keys per channel, values per token, "
                            "groups of 128); default: the run's dtype")
    group.add_argument("--kv-residual", type=int, default=0,
                       help="KIVI: recent tokens kept in float32 beside a quantized --kv-dtype (default 0)")
    group.add_argument("--expert-cache", type=float, metavar="F",
                       help="MoE: fraction of each layer's experts held in memory (the most routed); "
                            "the rest on disk, read when routed to")
    plan = parser.add_argument_group("parallel plans, in worker processes on this host")
    plan.add_argument("--tp", type=int, default=1, help="tensor-parallel workers (default 1)")
    plan.add_argument("--ep", type=int, default=1,
                      help="expert-parallel workers, attention data-parallel between them (default 1)")
    plan.add_argument("--pp", type=int, default=1, help="pipeline stages, one worker each (default 1)")
    plan.add_argument("--micro-batches", type=int, default=1,
                      help="pipeline micro-batches per step (default 1)")
    spec = parser.add_argument_group("speculative decoding")
    spec.add_argument("--draft-model", help="draft model (name or path); turns speculative decoding on")
    spec.add_argument("--spec-gamma", type=int, default=4, help="tokens drafted per round (default 4)")
    spec.add_argument("--spec-alpha", type=float, default=0.8,
                      help="probability a drafted token is accepted, drawn from the seed (default 0.8)")
    return parser


def strategy_options(args: argparse.Namespace, layers: int) -> dict[str, Any]:
    """``execute`` keyword arguments for the strategy flags."""
    from simulator.strategies.offload import parse_fractions

    options: dict[str, Any] = {"prefetch": not args.no_prefetch}
    disk = parse_fractions(args.offload_weights, ("disk",), "--offload-weights").get("disk", 0.0)
    options["offload_layers"] = round(disk * layers)
    options.update(kv_policy=args.kv_policy, kv_budget=args.kv_budget, kv_sinks=args.kv_sinks,
                   kv_residual=args.kv_residual, expert_cache=args.expert_cache)
    if args.kv_dtype is not None:
        options["kv_bits"] = int(args.kv_dtype.removeprefix("int"))
    options.update(tp=args.tp, ep=args.ep, pp=args.pp, micro_batches=args.micro_batches,
                   draft_model=args.draft_model, spec_gamma=args.spec_gamma, spec_alpha=args.spec_alpha)
    return options


def cmd_execute(args: argparse.Namespace) -> int:
    from simulator.specs.loader import load_model
    from validation.executor.harness import execute

    spec = load_model(args.model)
    result = execute(
        spec, batch=args.batch, input_len=args.input_len, output_len=args.output_len,
        backend=args.backend, device=args.device, dtype=args.dtype, repeats=args.repeats,
        warmup=args.warmup, seed=args.seed, **strategy_options(args, spec.num_layers),
    )
    report = result.to_dict()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_execution(report)
    return 0


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``execute-serve`` to an ``argparse`` subparsers object; returns the new parser."""
    parser = subparsers.add_parser(
        "execute-serve", help="serve requests with the reference executor in real time and measure it",
        description="Serve requests arriving on the wall clock (a Poisson process or a trace) with "
                    "continuous batching over the reference executor (random weights, greedy tokens) "
                    "and report TTFT, TBT, end-to-end latency and throughput.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"shipped model name, or a YAML/config.json path (default {DEFAULT_MODEL})")
    poisson = parser.add_argument_group("Poisson workload (the default)")
    poisson.add_argument("--rate", type=float, help="arrivals per second (default 2)")
    poisson.add_argument("--requests", type=int, help="requests (default 20)")
    poisson.add_argument("--input-len", help="prompt tokens: N, or LO:HI uniform (default 64)")
    poisson.add_argument("--output-len", help="output tokens: N, or LO:HI uniform (default 16)")
    trace = parser.add_argument_group("trace workload (arrived_at,num_prefill_tokens,num_decode_tokens)")
    trace.add_argument("--trace", help="trace CSV, e.g. the Azure LLM inference trace's splitwise_conv.csv")
    trace.add_argument("--max-requests", type=int, help="the trace's first N requests (default all)")
    trace.add_argument("--time-scale", type=float, help="multiply the arrival times (default 1)")
    trace.add_argument("--length-scale", type=float, help="multiply the token counts (default 1)")
    trace.add_argument("--max-input-len", type=int, help="clip prompts to N tokens")
    trace.add_argument("--max-output-len", type=int, help="clip outputs to N tokens")
    sched = parser.add_argument_group("scheduler")
    sched.add_argument("--scheduler", default="continuous",
                       help="continuous (vLLM: whole prompts, prefill priority; default) or chunked "
                            "(Sarathi: decodes first, prompt chunks fill --chunk-size)")
    sched.add_argument("--chunk-size", type=int, default=256,
                       help="chunked: tokens per iteration (default 256)")
    sched.add_argument("--max-batch", type=int, default=32, help="running requests at most (default 32)")
    sched.add_argument("--max-batch-tokens", type=int,
                       help="prompt tokens per iteration (continuous; default max(2048, longest "
                            "prompt)), or a cap on --chunk-size (chunked)")
    sched.add_argument("--kv-capacity-tokens", type=int,
                       help="KV tokens reserved at once (prompt + output per running request); "
                            "default: every request, within half the free memory")
    parser.add_argument("--backend", default="numpy", help="numpy (default) or torch")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] (torch only)")
    parser.add_argument("--dtype", default="float32", help="float32 (default); 16-bit types need torch")
    parser.add_argument("--seed", type=int, default=0, help="weights, prompts and arrivals seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--records-out", help="write the per-request records here (CSV or .parquet)")
    parser.add_argument("--iterations-out", help="write the per-iteration records here (CSV or .parquet)")
    return parser


POISSON_FLAGS = ("rate", "requests", "input_len", "output_len")
TRACE_FLAGS = ("max_requests", "time_scale", "length_scale", "max_input_len", "max_output_len")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _length(text: str, flag: str) -> int | tuple[int, int]:
    """``N`` or ``LO:HI``."""
    try:
        parts = [int(part) for part in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise InferSimError(f"{flag} {text!r}: give a token count N or a uniform range LO:HI")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def serve_requests(args: argparse.Namespace) -> list[Any]:
    """The workload the flags ask for: a trace, or a Poisson process."""
    from validation.executor.serve import poisson_requests, trace_requests

    if args.trace is not None:
        given = [_flag(name) for name in POISSON_FLAGS if getattr(args, name) is not None]
        if given:
            raise InferSimError(f"--trace gives the arrivals and lengths; drop {', '.join(given)}")
        return trace_requests(args.trace, args.max_requests, args.time_scale or 1.0,
                              args.length_scale or 1.0, args.max_input_len, args.max_output_len)
    given = [_flag(name) for name in TRACE_FLAGS if getattr(args, name) is not None]
    if given:
        raise InferSimError(f"{', '.join(given)}: only with --trace FILE (these shape a trace workload)")
    return poisson_requests(2.0 if args.rate is None else args.rate,
                            20 if args.requests is None else args.requests,
                            _length(args.input_len or "64", "--input-len"),
                            _length(args.output_len or "16", "--output-len"), args.seed)


def cmd_execute_serve(args: argparse.Namespace) -> int:
    from validation.executor.serve import ServeConfig, serve

    records = serve(args.model, serve_requests(args),
                    ServeConfig(args.scheduler, args.max_batch, args.max_batch_tokens, args.chunk_size,
                                args.kv_capacity_tokens),
                    seed=args.seed, backend=args.backend, device=args.device, dtype=args.dtype)
    for path, kind in ((args.records_out, "requests"), (args.iterations_out, "iterations")):
        if path:
            try:
                records.write(path, kind)
            except OSError as err:
                raise InferSimError(f"cannot write {kind} records to {path}: {err.strerror}") from None
    report = {**records.summary(), "wall_s": records.meta["wall_s"], "meta": records.meta}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_serve(report)
    return 0


def print_serve(report: dict[str, Any]) -> None:
    """A rich table of the serving run's latency percentiles and throughput."""
    from rich.console import Console
    from rich.table import Table

    meta = report["meta"]
    table = Table(title=f"{meta['model']} on {meta['backend']}/{meta['device']}: {meta['scheduler']} "
                        f"scheduler, {report['completed']} of {report['requests']} requests completed")
    table.add_column("metric")
    for p in ("p50", "p90", "p99"):
        table.add_column(p, justify="right")
    for name, key in (("TTFT", "ttft_s"), ("TBT", "tbt_s"), ("end to end", "e2e_s")):
        table.add_row(name, *(_ms(report[key][p]) for p in ("p50", "p90", "p99")))
    console = Console()
    console.print(table)
    console.print(f"throughput {report['throughput_tokens_per_s']:.1f} tok/s, "
                  f"{report['throughput_requests_per_s']:.2f} req/s over a {report['makespan_s']:.2f} s "
                  f"makespan (wall {report['wall_s']:.2f} s); KV capacity "
                  f"{meta['kv_capacity_tokens']} tokens")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.1f}%"


def print_execution(report: dict[str, Any]) -> None:
    """A rich table of the medians, noise and memory."""
    from rich.console import Console
    from rich.table import Table

    machine = report["machine"]
    title = (f"{report['model']} on {report['backend']}/{report['device']} {report['dtype']}: "
             f"batch {report['batch']}, {report['input_len']} in, {report['output_len']} out "
             f"({len(report['repeats'])} repeats)")
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("median", justify="right")
    table.add_column("spread (max-min)/median", justify="right")
    noise = report["noise"]
    table.add_row("TTFT", _ms(report["ttft_s"]), _pct(noise["ttft_s"]))
    table.add_row("TPOT", _ms(report["tpot_s"]), _pct(noise["tpot_s"]))
    table.add_row("end to end", _ms(report["e2e_s"]), _pct(noise["e2e_s"]))
    table.add_row("throughput", f"{report['throughput_tokens_per_s']:.1f} tok/s",
                  _pct(noise["throughput_tokens_per_s"]))
    for phase in ("prefill", "decode"):
        kernels = report["kernels_per_step"][phase]
        if kernels is None:
            continue
        table.add_row(f"{phase} dispatch / step", _ms(report["dispatch_s_per_step"][phase]), "")
        table.add_row(f"{phase} kernels / step", f"{kernels:.0f}", "")
    memory = report["memory"]
    table.add_row("peak memory", f"{report['peak_memory_bytes'] / 2**20:.1f} MiB",
                  f"weights {memory['weights_bytes'] / 2**20:.0f} + KV {memory['kv_cache_bytes'] / 2**20:.1f}"
                  f" + act {memory['activations_peak_bytes'] / 2**20:.1f} MiB")
    table.add_row("peak RSS", f"{memory['rss_peak_bytes'] / 2**20:.1f} MiB", "")
    if "parallel" in report:
        _parallel_rows(table, report["parallel"])
    if "speculative" in report:
        _speculative_rows(table, report["speculative"])
    if "strategy" in report:
        _strategy_rows(table, report["strategy"])
    console = Console()
    console.print(table)
    console.print(f"{machine.get('cpu_model')}, {machine.get('usable_cores')} cores, "
                  f"numpy {machine.get('numpy')}, BLAS {machine.get('blas', {}).get('name', '?')}")


def _parallel_rows(table: Any, parallel: dict[str, Any]) -> None:
    table.add_row("workers", f"{parallel['workers']}",
                  f"tp {parallel['tp']}, ep {parallel['ep']}, pp {parallel['pp']}, "
                  f"{parallel['micro_batches']} micro-batches")
    for phase in ("prefill", "decode"):
        collectives = parallel[phase]["collectives"]
        calls = ", ".join(f"{c['calls']:.0f} {name} ({c['bytes'] / 2**10:.0f} KiB)"
                          for name, c in collectives.items())
        table.add_row(f"{phase} collectives / step (rank 0)", _ms(parallel[phase]["comm_s_per_step"]),
                      calls or "-")


def _speculative_rows(table: Any, speculative: dict[str, Any]) -> None:
    table.add_row("draft", speculative["draft"],
                  f"gamma {speculative['gamma']}, alpha {speculative['alpha']}")
    per_round = speculative["tokens_per_round"]
    table.add_row("rounds", f"{speculative['rounds']}",
                  "-" if per_round is None else f"{per_round:.2f} tokens / round "
                  f"(expected {speculative['expected_tokens_per_round']:.2f})")
    table.add_row("draft step", _ms(speculative["draft_step_s"]), "")
    table.add_row("verify step", _ms(speculative["verify_step_s"]), "")


def _strategy_rows(table: Any, strategy: dict[str, Any]) -> None:
    if "offload" in strategy:
        offload = strategy["offload"]
        table.add_row("layers on disk", f"{offload['layers_on_disk']}",
                      f"{offload['layer_bytes'] / 2**20:.1f} MiB each, "
                      f"{'prefetch' if offload['prefetch'] else 'no prefetch'}")
    if "kv_policy" in strategy:
        policy = strategy["kv_policy"]
        detail = ", ".join(f"{name} {policy[name]}" for name in ("sinks", "heavy_hitters", "recent")
                           if name in policy)
        table.add_row("KV policy", f"{policy['kind']} {policy['budget_tokens']} tokens", detail)
    if "kv_quantization" in strategy:
        quant = strategy["kv_quantization"]
        table.add_row("KV quantization", f"int{quant['bits']}",
                      f"groups of {quant['group_size']}, {quant['residual_tokens']} residual tokens; codes "
                      f"{quant['codes_bytes'] / 2**20:.2f} + scales {quant['scale_bytes'] / 2**20:.2f} + "
                      f"residual {quant['residual_bytes'] / 2**20:.2f} MiB")
    if "expert_cache" in strategy:
        experts = strategy["expert_cache"]
        table.add_row("expert cache", f"{experts['cached_per_layer']} of {experts['experts_per_layer']}"
                      " per layer", f"{experts['disk_bytes'] / 2**20:.1f} MiB of experts on disk")
    for phase, counters in strategy.get("counters", {}).items():
        if counters:
            table.add_row(f"{phase} counters / step", "",
                          ", ".join(f"{name} {value:.4g}" for name, value in counters.items()))
