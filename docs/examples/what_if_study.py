"""What if we served Llama-2-7B or Llama-3.1-8B on A100s instead of H100s?

A what-if study in three steps: describe the configurations as axes, let ``simulator.sweep``
estimate every one of them (one row each, those that do not fit included, with the reason),
then let ``write_report`` draw what the table says.

    python docs/examples/what_if_study.py [--out DIR]

writes the study (``study.parquet``) and its report (``pareto.png``, ``latency_breakdown.png``,
``memory_breakdown.png``, ``roofline.png``, ``heatmap.png``, ``summary.md``) into DIR (default: a
new temporary folder). The same from the command line:

    infersim sweep STUDY.yaml --out study.parquet && infersim report study.parquet --out DIR
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import simulator
from simulator.report.study_report import write_report

# 1. The questions, as axes: every combination is one configuration (2 x 2 x 3 x 7 x 2 = 168).
#    The DGX systems hold 8 devices each, so tensor parallelism up to 4 has devices to run on.
AXES = {
    "model": ["llama-2-7b", "llama-3.1-8b"],
    "hardware": ["dgx-a100", "dgx-h100"],
    "tp": [1, 2, 4],
    "batch": {"log2": [1, 64]},       # 1, 2, 4, ..., 64 sequences per step
    "input_len": [512, 2048],         # prompt tokens
    "output_len": 128,                # generated tokens
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the study and its plots (default: a temp dir)")
    out = parser.parse_args(argv).out or Path(tempfile.mkdtemp(prefix="infersim-what-if-"))
    out.mkdir(parents=True, exist_ok=True)

    # 2. Estimate every configuration. Groups without strategies are costed as arrays, so this
    #    takes well under a second; add_cost (on by default) prices each row from
    #    hardware_specs/prices.yaml.
    study = simulator.sweep(AXES)
    study.to_parquet(out / "study.parquet", index=False)
    feasible = study[study["feasible"]]
    print(f"{len(study)} configurations, {len(feasible)} fit in memory")

    # A first look without plots: the cheapest feasible configuration per model and hardware.
    cheapest = (feasible.sort_values("cost_usd_per_million_tokens")
                .groupby(["model", "hardware"], sort=True).head(1))
    print(cheapest[["model", "hardware", "tp", "batch", "input_len", "tpot_s",
                    "cost_usd_per_million_tokens"]].to_string(index=False))

    # 3. The report: the Pareto front of throughput per device against per-user speed (1 / TPOT),
    #    where the time of the best plans goes (by kind of op and phase), their memory, their steps
    #    on each device's roofline, and a heat map of throughput over batch and prompt length.
    #    ``objectives``, ``heatmap`` and ``top`` choose what is drawn; the defaults are used here
    #    but for the heat map, which shows TPOT instead of throughput.
    paths = write_report(study, out, heatmap="batch,input_len,tpot_s", top=5)
    for kind, path in paths.items():
        print(f"{kind:>8}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
