"""Run the reference executor over a grid of cases and record medians and noise.

    python -m validation.measure --suite quick|full --out validation/measurements/FILE.csv

Each row is one case (model, batch, prompt and output length) with the
repeats' median, min, max and coefficient of variation of TTFT and TPOT, the
time outside the math, the machine and the load average before and after.
Cases disturbed by another process (load average above the cores' worth of
this process) are run again once; the row records how often.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import Progress

# (model, largest batch x prompt tokens of a prefill) of each suite's models.
FULL_MODELS = [("tiny-dense-58m", 8192), ("tiny-moe-140m", 8192), ("small-dense-250m", 2048)]
BATCHES = [1, 2, 4, 8, 16, 32]
PROMPTS = [128, 256, 512, 1024, 2048, 4096]


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    input_len: int
    output_len: int

    @property
    def key(self) -> str:
        return f"{self.model}/b{self.batch}/p{self.input_len}/g{self.output_len}"


def suite(name: str) -> list[Case]:
    if name == "quick":
        return [Case(model, batch, prompt, 8)
                for model in ("tiny-dense-58m", "tiny-moe-140m")
                for batch in (1, 4, 16) for prompt in (128, 512)]
    if name == "full":
        return [Case(model, batch, prompt, 16)
                for model, cap in FULL_MODELS for batch in BATCHES for prompt in PROMPTS
                if batch * prompt <= cap]
    raise SystemExit(f"unknown suite {name!r}; choose quick or full")


def _cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.mean(values) if len(values) > 1 else 0.0


def measure_case(case: Case, repeats: int) -> dict[str, Any]:
    from validation.executor.harness import execute

    result = execute(case.model, batch=case.batch, input_len=case.input_len,
                     output_len=case.output_len, repeats=repeats)
    ttft = [r.ttft_s for r in result.repeats]
    tpot = [r.tpot_s for r in result.repeats if r.tpot_s is not None]
    data = result.to_dict()
    return {
        "case": case.key, "model": case.model, "batch": case.batch, "input_len": case.input_len,
        "output_len": case.output_len, "repeats": len(ttft),
        "ttft_median_s": statistics.median(ttft), "ttft_min_s": min(ttft), "ttft_max_s": max(ttft),
        "ttft_cv": _cv(ttft),
        "tpot_median_s": statistics.median(tpot), "tpot_min_s": min(tpot), "tpot_max_s": max(tpot),
        "tpot_cv": _cv(tpot),
        "e2e_median_s": result.e2e_s,
        "dispatch_prefill_s": data["dispatch_s_per_step"]["prefill"],
        "dispatch_decode_s": data["dispatch_s_per_step"]["decode"],
        "kernels_decode": data["kernels_per_step"]["decode"],
        "peak_memory_bytes": data["peak_memory_bytes"],
    }


def run(cases: list[Case], out: Path, repeats: int) -> list[dict[str, Any]]:
    from validation.executor.machine import machine_info

    info = machine_info("numpy", "cpu")
    cores = os.cpu_count() or 1
    rows = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with Progress() as progress:
        task = progress.add_task("measuring", total=len(cases))
        for case in cases:
            progress.update(task, description=case.key)
            reruns = 0
            while True:
                load_before = os.getloadavg()[0]
                row = measure_case(case, repeats)
                load_after = os.getloadavg()[0]
                # This process keeps at most `cores` busy; more than one core's worth beyond
                # that means someone else was running.
                disturbed = load_after > cores + 1.0
                if not disturbed or reruns >= 1:
                    break
                reruns += 1
            row.update({"load_before": round(load_before, 2), "load_after": round(load_after, 2),
                        "reruns": reruns, "cpu": info.get("cpu_model", ""),
                        "cores": info.get("usable_cores", cores)})
            rows.append(row)
            progress.advance(task)
            with open(out, "w", newline="") as handle:  # write as we go: a long run survives a stop
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.measure",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=("quick", "full"), default="quick")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--repeats", type=int, help="timed runs per case (default: quick 2, full 3)")
    args = parser.parse_args(argv)
    cases = suite(args.suite)
    repeats = args.repeats or (2 if args.suite == "quick" else 3)
    rows = run(cases, args.out, repeats)
    print(f"wrote {len(rows)} cases to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
