"""Serving runs of the executor, measured, and the engine's prediction of each.

    python -m validation.serving measure --out validation/measurements/serve-NAME [--suite quick|full]
    python -m validation.serving compare --measurements validation/measurements/serve-NAME \
        --hardware hardware_specs/local/epyc-2core.yaml [--report docs/validation/serve-NAME.md]
        [--max-median-error 0.15]

``measure`` runs each case of the suite (a model, a scheduler, an arrival rate, request lengths,
a seed) through the executor's real serving loop (``validation.executor.serve``) ``--rounds``
times round-robin, and writes each run's per-request and per-iteration records
(``CASE.rN.requests.csv``, ``CASE.rN.iterations.csv``) and one ``summary.csv`` row per run,
with the machine and the load average before and after.

``compare`` replays every measured run's requests (the same arrival times and lengths) through
the engine (``simulator.engine``) with the calibrated host spec, the executor's settings
(float32, eager attention launched per request) and the run's scheduler limits, and reports the
error of p50 and p90 TTFT, p50 and p90 TBT and throughput per run, and their median absolute
errors over all runs. Nothing here is fitted: the host spec comes from microbenchmarks only.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

METRICS = ("ttft_p50", "ttft_p90", "tbt_p50", "tbt_p90", "throughput")


@dataclass(frozen=True)
class ServeCase:
    model: str
    scheduler: str
    rate: float
    requests: int
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    seed: int = 0
    chunk_size: int = 256
    max_batch: int = 32

    @property
    def name(self) -> str:
        return (f"{self.model}-{self.scheduler}-r{self.rate:g}-p{self.input_len[0]}_{self.input_len[1]}"
                f"-g{self.output_len[0]}_{self.output_len[1]}-s{self.seed}")


def suite(name: str) -> list[ServeCase]:
    """Rates below and above what each model serves on a 2-core host, two schedulers."""
    short, long_ = (32, 256), (64, 512)
    if name == "quick":
        return [ServeCase("tiny-dense-58m", "continuous", 2.0, 16, short, (8, 32)),
                ServeCase("tiny-dense-58m", "chunked", 6.0, 16, short, (8, 32))]
    if name != "full":
        raise SystemExit(f"unknown suite {name!r}: quick or full")
    cases = []
    for model, rates in (("tiny-dense-58m", (1.0, 4.0, 12.0)), ("tiny-moe-140m", (1.0, 3.0, 8.0))):
        for scheduler in ("continuous", "chunked"):
            for rate in rates:
                cases.append(ServeCase(model, scheduler, rate, 40, short, (8, 64), seed=int(rate * 10)))
    cases.append(ServeCase("tiny-dense-58m", "chunked", 3.0, 30, long_, (16, 64), seed=5))
    cases.append(ServeCase("tiny-dense-58m", "continuous", 3.0, 30, long_, (16, 64), seed=5))
    cases.append(ServeCase("small-dense-250m", "continuous", 0.5, 20, short, (8, 32), seed=7))
    cases.append(ServeCase("small-dense-250m", "chunked", 2.0, 20, short, (8, 32), seed=7))
    return cases


def _load() -> float:
    return os.getloadavg()[0]


def measure(out: Path, suite_name: str, rounds: int) -> int:
    from rich.progress import Progress

    from simulator.calibrate.host import machine
    from validation.executor.serve import ServeConfig, poisson_requests
    from validation.executor.serve import serve as execute_serve

    out.mkdir(parents=True, exist_ok=True)
    host = machine()
    rows = []
    cases = suite(suite_name)
    with Progress() as progress:
        task = progress.add_task("serving runs", total=len(cases) * rounds)
        for r in range(rounds):
            for case in cases:
                requests = poisson_requests(case.rate, case.requests, case.input_len, case.output_len,
                                            case.seed)
                config = ServeConfig(scheduler=case.scheduler, max_batch=case.max_batch,
                                     chunk_size=case.chunk_size)
                before = _load()
                records = execute_serve(case.model, requests, config, seed=case.seed)
                after = _load()
                stem = out / f"{case.name}.r{r}"
                records.requests.to_csv(f"{stem}.requests.csv", index=False)
                records.iterations.to_csv(f"{stem}.iterations.csv", index=False)
                summary = records.summary()
                it = records.iterations
                kernel_s = float(it["kernel_s"].sum()) if "kernel_s" in it else None
                rows.append({"case": case.name, "round": r, **asdict(case), "kernel_s": kernel_s,
                             "max_batch_tokens": records.meta.get("max_batch_tokens"),
                             "ttft_p50": summary["ttft_s"]["p50"], "ttft_p90": summary["ttft_s"]["p90"],
                             "tbt_p50": summary["tbt_s"]["p50"], "tbt_p90": summary["tbt_s"]["p90"],
                             "throughput": summary["throughput_tokens_per_s"],
                             "makespan_s": summary["makespan_s"], "load_before": before,
                             "load_after": after, "cpu": host.cpu, "cores": host.cores})
                progress.advance(task)
    frame = pd.DataFrame(rows)
    frame["input_len"] = frame["input_len"].map(lambda v: f"{v[0]}:{v[1]}")
    frame["output_len"] = frame["output_len"].map(lambda v: f"{v[0]}:{v[1]}")
    frame.to_csv(out / "summary.csv", index=False, quoting=csv.QUOTE_MINIMAL)
    print(f"wrote {len(frame)} runs to {out}")
    return 0


def predict_run(row: Any, folder: Path, hardware: str, step_overhead_s: float = 0.0) -> dict[str, float]:
    """The engine's numbers for one measured run: its requests replayed on ``hardware``."""
    from simulator.engine.scheduler import SchedulerConfig
    from simulator.engine.serve import serve
    from simulator.engine.workload import Workload
    from validation.compare import EXECUTOR_SETTINGS

    stem = folder / f"{row.case}.r{int(row.round)}"
    measured = pd.read_csv(f"{stem}.requests.csv")
    workload = Workload(measured["arrival_s"].to_numpy(dtype=float),
                        measured["prompt_tokens"].to_numpy(dtype=np.int64),
                        measured["output_tokens"].to_numpy(dtype=np.int64), source=str(stem))
    tokens = row.max_batch_tokens
    config = SchedulerConfig(policy=row.scheduler, max_batch=int(row.max_batch),
                             max_batch_tokens=8192 if pd.isna(tokens) else int(tokens),
                             chunk_size=int(row.chunk_size),
                             prefix_caching=False)
    records = serve(row.model, hardware, workload, config, step_overhead_s=step_overhead_s,
                    **EXECUTOR_SETTINGS)
    s = records.summary()
    return {"ttft_p50": s["ttft_s"]["p50"], "ttft_p90": s["ttft_s"]["p90"], "tbt_p50": s["tbt_s"]["p50"],
            "tbt_p90": s["tbt_s"]["p90"], "throughput": s["throughput_tokens_per_s"],
            "sim_wall_s": records.meta["sim_wall_s"]}


def compare(folder: Path, hardware: str, report: Path | None, max_median: float | None) -> int:
    from rich.console import Console
    from rich.table import Table

    summary = pd.read_csv(folder / "summary.csv")
    rows = []
    for row in summary.itertuples():
        predicted = predict_run(row, folder, hardware)
        entry: dict[str, Any] = {"case": row.case, "round": int(row.round)}
        for metric in METRICS:
            measured = float(getattr(row, metric))
            entry[f"{metric}_measured"] = measured
            entry[f"{metric}_predicted"] = predicted[metric]
            entry[f"{metric}_error"] = predicted[metric] / measured - 1 if measured else float("nan")
        rows.append(entry)
    frame = pd.DataFrame(rows)
    medians = {m: float(np.nanmedian(np.abs(frame[f"{m}_error"]))) for m in METRICS}
    table = Table(title=f"engine vs executor serving runs ({folder})")
    table.add_column("run")
    for m in METRICS:
        table.add_column(m, justify="right")
    for entry in rows:
        cells = []
        for m in METRICS:
            unit = 1.0 if m == "throughput" else 1e3
            cells.append(f"{entry[f'{m}_measured'] * unit:.1f} / {entry[f'{m}_predicted'] * unit:.1f} "
                         f"({entry[f'{m}_error']:+.0%})")
        table.add_row(f"{entry['case']} r{entry['round']}", *cells)
    console = Console(width=220)
    console.print(table)
    line = ", ".join(f"{m} {medians[m]:.1%}" for m in METRICS)
    console.print(f"median |error| over {len(rows)} runs: {line}")
    by_round = _by_round(frame)
    for r, values in by_round.items():
        console.print(f"  round {r}: " + ", ".join(f"{m} {values[m]:.1%}" for m in METRICS))
    if report is not None:
        _write_report(report, frame, medians, folder, hardware, summary)
        console.print(f"wrote {report}")
    if max_median is not None and max(medians.values()) > max_median:
        return 1
    return 0


def _by_round(frame: pd.DataFrame) -> dict[int, dict[str, float]]:
    return {int(r): {m: float(np.nanmedian(np.abs(rows[f"{m}_error"]))) for m in METRICS}
            for r, rows in frame.groupby("round")}


def _write_report(path: Path, frame: pd.DataFrame, medians: dict[str, float], folder: Path,
                  hardware: str, summary: pd.DataFrame) -> None:
    lines = [f"# Engine vs executor serving runs: {folder.name}", "",
             f"Measured: `python -m validation.serving measure --out {folder}`; predicted with "
             f"`python -m validation.serving compare --measurements {folder} --hardware {hardware}`.",
             f"Machine: {summary['cpu'].iloc[0]}, {summary['cores'].iloc[0]} cores; load average "
             f"{summary['load_before'].min():.2f}-{summary[['load_before', 'load_after']].max().max():.2f}.",
             "", "Each cell: measured / predicted (error). Times in ms, throughput in output tokens/s.", "",
             "| run | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for entry in frame.to_dict("records"):
        cells = []
        for m in METRICS:
            unit = 1.0 if m == "throughput" else 1e3
            cells.append(f"{entry[f'{m}_measured'] * unit:.1f} / {entry[f'{m}_predicted'] * unit:.1f} "
                         f"({entry[f'{m}_error']:+.0%})")
        lines.append(f"| {entry['case']} r{entry['round']} | " + " | ".join(cells) + " |")
    rounds = _by_round(frame)
    heads = " | ".join(f"round {r}" for r in rounds)
    lines += ["", f"| metric | median abs error, all runs | {heads} |", "|---|---|" + "---|" * len(rounds)]
    lines += [f"| {m} | {v:.1%} | " + " | ".join(f"{rounds[r][m]:.1%}" for r in rounds) + " |"
              for m, v in medians.items()]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.serving")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", required=True)
    m.add_argument("--suite", default="full", choices=("quick", "full"))
    m.add_argument("--rounds", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("--measurements", required=True)
    c.add_argument("--hardware", required=True)
    c.add_argument("--report")
    c.add_argument("--max-median-error", type=float)
    args = parser.parse_args(argv)
    if args.command == "measure":
        return measure(Path(args.out), args.suite, args.rounds)
    return compare(Path(args.measurements), args.hardware, Path(args.report) if args.report else None,
                   args.max_median_error)


if __name__ == "__main__":
    sys.exit(main())
