"""``infersim plan-search``: the best deployment plans under SLOs, confirmed in the serving engine."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pandas as pd

from simulator.study.plan_search import DEFAULT_LOAD, DEFAULT_REQUESTS, OBJECTIVES, PlanSearchResult


def add_plan_search_parser(sub: Any) -> None:
    p = sub.add_parser("plan-search", help="best plans (parallelism, batch, dtypes, hardware, replicas) "
                                           "under TTFT/TPOT SLOs, confirmed in the serving engine")
    p.add_argument("--model", required=True, help="shipped model name, or a YAML/config.json path")
    p.add_argument("--hardware", required=True, metavar="H1,H2,...",
                   help="devices or systems to plan on, comma-separated (e.g. dgx-a100,dgx-h100)")
    p.add_argument("--slo-ttft", type=float, metavar="S", help="time to first token SLO, seconds")
    p.add_argument("--slo-tpot", type=float, metavar="S",
                   help="time per output token SLO, seconds (the engine checks its p90 gap between tokens)")
    w = p.add_argument_group("workload (a trace, or Poisson arrivals of fixed lengths)")
    w.add_argument("--workload", metavar="TRACE",
                   help="trace CSV with arrived_at, num_prefill_tokens, num_decode_tokens "
                        "(e.g. ../shared/traces/azure-llm-inference-2023/splitwise_conv.csv)")
    w.add_argument("--input-len", type=int, help="prompt tokens without a trace (default 512)")
    w.add_argument("--output-len", type=int, help="output tokens without a trace (default 128)")
    w.add_argument("--rate", type=float, metavar="QPS",
                   help="requests per second to carry (sets the replicas; rescales a trace's arrivals); "
                        "without it and a trace, each plan is checked at --load of its capacity")
    s = p.add_argument_group("search")
    s.add_argument("--objective", default="cost", help=f"{', '.join(OBJECTIVES)} (default cost: USD per "
                                                        "million output tokens)")
    s.add_argument("--top", type=int, default=5, help="configurations listed by the estimate (default 5)")
    s.add_argument("--confirm", type=int, default=3,
                   help="plans confirmed in the engine, trying the next candidate when one fails "
                        "(default 3; 0: the estimate's plans, unconfirmed)")
    s.add_argument("--prices", metavar="FILE",
                   help="USD per device-hour (default hardware_specs/prices.yaml)")
    s.add_argument("--tp", metavar="N,...", help="tensor-parallel degrees (default powers of two up to "
                                                 "the system's devices)")
    s.add_argument("--pp", metavar="N,...", help="pipeline stages (default as --tp)")
    s.add_argument("--ep", metavar="N,...", help="expert-parallel degrees, MoE (default 1)")
    s.add_argument("--batch", metavar="N,...", help="batches, the most sequences a replica runs "
                                                    "(default powers of two up to 256)")
    s.add_argument("--weight-dtype", metavar="D,...",
                   help="weight dtypes (default bf16, fp8 where the device has fp8 units, int8)")
    s.add_argument("--kv-dtype", metavar="D,...",
                   help="KV-cache dtypes (default the activation dtype, and fp8 where the device has fp8)")
    e = p.add_argument_group("engine confirmation")
    e.add_argument("--requests", type=int, default=DEFAULT_REQUESTS,
                   help=f"requests per serving run (default {DEFAULT_REQUESTS})")
    e.add_argument("--load", type=float, default=DEFAULT_LOAD,
                   help=f"share of a replica's estimated capacity it carries (default {DEFAULT_LOAD})")
    e.add_argument("--scheduler", default="chunked",
                   choices=("static", "continuous", "chunked", "decode-priority"),
                   help="batching policy of the serving runs (default chunked: decodes never wait "
                        "behind a whole prompt, as in vLLM and SGLang's chunked prefill)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-engine-runs", type=int,
                   help="serving runs at most (default max(12, 4 x --confirm))")
    p.add_argument("--json", action="store_true", help="print JSON (plans, dropped, candidates, why)")


def cmd_plan_search(args: argparse.Namespace) -> int:
    from simulator.errors import InferSimError
    from simulator.study.plan_search import NoPlanError, plan_search

    if args.workload and (args.input_len is not None or args.output_len is not None):
        raise InferSimError("--workload brings its own lengths: drop --input-len/--output-len")
    try:
        result = plan_search(
            args.model, args.hardware, args.slo_ttft, args.slo_tpot, args.workload,
            input_len=512 if args.input_len is None else args.input_len,
            output_len=128 if args.output_len is None else args.output_len, rate=args.rate,
            objective=args.objective, top=args.top, confirm=args.confirm, prices=args.prices,
            tp=args.tp, pp=args.pp, ep=args.ep, batch=args.batch, weight_dtype=args.weight_dtype,
            kv_dtype=args.kv_dtype, requests=args.requests, load=args.load, scheduler=args.scheduler,
            seed=args.seed, max_engine_runs=args.max_engine_runs)
    except NoPlanError as err:  # the engine dropped every candidate: show what was tried, then the error
        if err.result is not None:
            if args.json:
                print(json.dumps(err.result.to_dict(), indent=2, default=str))
            else:
                print_dropped(err.result)
        raise
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return 0
    print_result(result)
    return 0


# --- tables -------------------------------------------------------------------------------------

COLUMNS = ("hardware", "tp", "pp", "ep", "batch", "weight_dtype", "kv_dtype", "replicas", "devices",
           "ttft_s", "tpot_s", "throughput_tokens_per_s", "cost_usd_per_million_tokens",
           "engine_ttft_p90_s", "engine_tbt_p90_s")
HEADERS = {"weight_dtype": "weights", "kv_dtype": "KV", "engine_ttft_p90_s": "engine TTFT p90",
           "engine_tbt_p90_s": "engine TBT p90", "throughput_tokens_per_s": "tok/s/replica"}


def _columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in COLUMNS if c in frame and not (c in ("pp", "ep") and (frame[c] == 1).all())]


def _table(frame: pd.DataFrame, title: str):
    from rich.table import Table

    from simulator.report.study_tables import HEADERS as STUDY_HEADERS
    from simulator.report.study_tables import format_cell

    columns = _columns(frame)
    table = Table(title=title)
    for column in columns:
        table.add_column(HEADERS.get(column, STUDY_HEADERS.get(column, column)),
                         justify="left" if frame[column].dtype == object and column in
                         ("hardware", "weight_dtype", "kv_dtype") else "right")
    for _, row in frame.iterrows():
        table.add_row(*(format_cell(c, row[c]) for c in columns))
    return table


def _slo_text(result: PlanSearchResult) -> str:
    return ", ".join(f"{'TTFT' if k == 'ttft_s' else 'TPOT'} <= {v:g} s" for k, v in result.slo.items())


def print_result(result: PlanSearchResult) -> None:
    from simulator.report.tables import console

    w = result.workload
    rate = (f"{w['rate_requests_per_s']:.3g} requests/s" if w["rate_requests_per_s"] is not None
            else "each plan at its --load of its capacity")
    console.print(f"[bold]plan search[/bold] by {result.objective} under {_slo_text(result)}: "
                  f"{w['source']}, {rate}, {w['input_len']} in / {w['output_len']} out (means); "
                  f"{len(result.study):,} configurations, {result.engine_runs} serving runs")
    confirmed = "engine_meets_slo" in result.plans
    title = ("plans meeting the SLOs in the estimate and in the engine" if confirmed
             else "plans by the estimate (not confirmed in the engine: --confirm 0)")
    console.print(_table(result.plans, title))
    for k, (_, row) in enumerate(result.plans.iterrows(), 1):
        console.print(f"{k}. {row['strategy']}; bigger batch: {row['binding']}; fewer devices: "
                      f"{row['binding_devices']}")
    print_dropped(result)
    console.print(f"estimate: {result.why}")
    for note in result.notes:
        console.print(f"note: {note}")


def print_dropped(result: PlanSearchResult) -> None:
    from simulator.report.tables import console
    from simulator.study.plan_search import describe

    for item in result.dropped:
        console.print(f"dropped: {describe(item)}, {item.get('replicas')} replicas: {item['why']}")
