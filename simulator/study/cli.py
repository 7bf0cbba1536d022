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
    start = time.perf_counter()
    configs = load_sweep(args.sweep)
    if args.dask or args.scheduler_address:
        from simulator.study.cluster import run_chunks

        frame = run_chunks(configs, Path(f"{out}.chunks"), chunk_size=args.chunk_size,
                           scheduler=args.scheduler_address or "local", workers=args.workers,
                           fast=not args.one_at_a_time)
    else:
        frame = evaluate(configs, fast=not args.one_at_a_time)
    write_table(frame, out)
    summary = {"out": str(out), "configurations": len(frame), "feasible": int(frame["feasible"].sum()),
               "as_arrays": int(frame.attrs.get("as_arrays", 0)), "wall_s": time.perf_counter() - start,
               "columns": list(frame.columns)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    from simulator.report.tables import console

    console.print(f"wrote {out}: {summary['configurations']:,} configurations, "
                  f"{summary['feasible']:,} feasible, "
                  f"{summary['as_arrays']:,} costed as arrays, in {summary['wall_s']:.2f} s")
    return 0
