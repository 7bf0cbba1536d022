"""``infersim sweep``: a sweep file's configurations into one Parquet or CSV table."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from simulator.errors import InferSimError

DEFAULT_CHUNK = 50_000


def add_sweep_parser(sub: Any) -> None:
    sweep = sub.add_parser("sweep", help="estimate every configuration of a sweep file (axes or rows) into "
                                         "a Parquet or CSV table")
    sweep.add_argument("sweep", help="sweep YAML: axes (a cross product) or rows; see workloads/sweeps/")
    sweep.add_argument("--out", required=True, help="table to write: NAME.parquet or NAME.csv")
    sweep.add_argument("--json", action="store_true", help="print a JSON summary instead of a line")
    sweep.add_argument("--one-at-a-time", action="store_true",
                       help="run estimate for every configuration instead of costing groups as arrays "
                            "(the reference the arrays reproduce; slower)")
    study = sweep.add_argument_group("cost, Pareto front and best plan")
    study.add_argument("--prices", metavar="FILE",
                       help="USD per device-hour per device name (default hardware_specs/prices.yaml): "
                            "adds devices and cost_usd_per_million_tokens")
    study.add_argument("--pareto", metavar="COL:DIR,...",
                       help="print the feasible Pareto front of these objectives, e.g. "
                            "tpot_s:min,throughput_tokens_per_s:max (short names: cost, throughput, "
                            "throughput_per_device, devices, ttft, tpot, energy)")
    study.add_argument("--plot", metavar="PNG",
                       help="draw the front over all feasible points (two objectives)")
    study.add_argument("--best", metavar="OBJECTIVE",
                       help="print the best plan meeting --slo-ttft/--slo-tpot by this objective "
                            "(cost, throughput, throughput_per_device, devices, or COLUMN:min|max)")
    study.add_argument("--slo-ttft", type=float, metavar="S", help="TTFT SLO in seconds (with --best)")
    study.add_argument("--slo-tpot", type=float, metavar="S", help="TPOT SLO in seconds (with --best)")
    study.add_argument("--top", type=int, default=5, help="plans shown after the best (default 5)")
    dask = sweep.add_argument_group("Dask (chunks of configurations as tasks; resumable)")
    dask.add_argument("--dask", action="store_true",
                      help="run on Dask: a LocalCluster unless --scheduler-address; finished chunks are kept "
                           "in OUT.chunks/ and not recomputed when the command is run again")
    dask.add_argument("--scheduler-address", metavar="tcp://HOST:PORT",
                      help="a running Dask scheduler (implies --dask)")
    dask.add_argument("--workers", type=int, help="LocalCluster worker processes (default: the cores)")
    dask.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                      help=f"configurations per task (default {DEFAULT_CHUNK:,})")


def write_table(frame: Any, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        frame.to_parquet(out, index=False)
    else:
        frame.to_csv(out, index=False)


def cmd_sweep(args: argparse.Namespace) -> int:
    from simulator.study.options import load_sweep
    from simulator.study.sweep import evaluate

    out = Path(args.out)
    if out.suffix not in (".parquet", ".csv"):
        raise InferSimError(f"--out {out}: name a .parquet or a .csv file")
    if args.chunk_size < 1:
        raise InferSimError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    objectives, prices = check_study_flags(args)
    start = time.perf_counter()
    configs = load_sweep(args.sweep)
    if args.dask or args.scheduler_address:
        from simulator.study.cluster import run_chunks

        frame = run_chunks(configs, Path(f"{out}.chunks"), chunk_size=args.chunk_size,
                           scheduler=args.scheduler_address or "local", workers=args.workers,
                           fast=not args.one_at_a_time)
    else:
        frame = evaluate(configs, fast=not args.one_at_a_time)
    from simulator.study.cost import add_cost

    frame = add_cost(frame, prices)
    write_table(frame, out)
    summary: dict[str, Any] = {
        "out": str(out), "configurations": len(frame), "feasible": int(frame["feasible"].sum()),
        "as_arrays": int(frame.attrs.get("as_arrays", 0)), "wall_s": time.perf_counter() - start,
        "columns": list(frame.columns)}
    front = best = None
    if objectives is not None:
        from simulator.study.pareto import pareto_front

        try:
            front = pareto_front(frame, objectives)
        except InferSimError as err:
            raise InferSimError(f"--pareto: {err}") from None
        summary["pareto"] = {"objectives": objectives, "plans": _records(front)}
        if args.plot:
            from simulator.report.pareto_plot import plot_pareto
            from simulator.study.pareto import with_derived

            derived = with_derived(frame)
            plot_pareto(derived[derived["feasible"].astype(bool)], front, objectives, args.plot)
            summary["plot"] = args.plot
    if args.best:
        from simulator.study.pareto import best_plan

        try:
            best = best_plan(frame, args.slo_ttft, args.slo_tpot, args.best)
        except InferSimError as err:
            raise InferSimError(f"--best: {err}") from None
        summary["best"] = best.to_dict()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    from simulator.report.tables import console

    console.print(f"wrote {out}: {summary['configurations']:,} configurations, "
                  f"{summary['feasible']:,} feasible, "
                  f"{summary['as_arrays']:,} costed as arrays, in {summary['wall_s']:.2f} s")
    if front is not None:
        from simulator.report.study_tables import print_front

        print_front(front, objectives)
        if args.plot:
            console.print(f"wrote {args.plot}")
    if best is not None:
        from simulator.report.study_tables import print_best

        print_best(best, args.top)
    return 0


def check_study_flags(args: argparse.Namespace) -> tuple[dict[str, str] | None, Any]:
    """The Pareto objectives and the prices, or a one-line error naming the flag at fault (before
    any configuration is costed)."""
    from simulator.study.cost import load_prices
    from simulator.study.pareto import parse_objectives

    for flag, value in (("--slo-ttft", args.slo_ttft), ("--slo-tpot", args.slo_tpot)):
        if value is not None and not value > 0:
            raise InferSimError(f"{flag} must be a positive number of seconds, got {value}")
    if (args.slo_ttft is not None or args.slo_tpot is not None) and not args.best:
        raise InferSimError("--slo-ttft/--slo-tpot need --best OBJECTIVE (for example --best cost)")
    if args.plot and not args.pareto:
        raise InferSimError("--plot needs --pareto COL:DIR,COL:DIR (the two objectives to draw)")
    if args.plot and Path(args.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
        raise InferSimError(f"--plot {args.plot}: name a .png, .pdf or .svg file")
    if args.top < 0:
        raise InferSimError(f"--top must be at least 0, got {args.top}")
    objectives = parse_objectives(args.pareto, "--pareto") if args.pareto else None
    if objectives is not None and args.plot and len(objectives) != 2:
        raise InferSimError(f"--plot draws two objectives; --pareto names {len(objectives)}")
    if args.best:
        parse_objectives(args.best, "--best")
    try:
        prices = load_prices(args.prices)
    except InferSimError as err:
        raise InferSimError(f"--prices: {err}") from None
    return objectives, prices


def _records(frame: Any) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records"))
