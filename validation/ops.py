"""Per op, the executor's measured time beside the simulator's prediction: where a miss comes from.

    python -m validation.ops --hardware hardware_specs/local/NAME.yaml --model tiny-moe-140m \
        --batch 4 --input-len 1024 [--output-len 16] [--repeats 3] [--phase decode|prefill] [--json]

Runs ``infersim execute`` (the executor's kernel profiler times every numeric call under the
simulator's op name) and ``estimate`` with the executor's settings (float32, eager attention) on
the host spec, and lists each op's time per step on both sides, largest miss first. The
simulator's three eager-attention ops (scores, softmax, values) are one ``attention`` call in the
executor and are summed; ops one side has and the other does not show as 0 (the executor's
``moe_permute``, for instance, is folded into the simulator's routing ops). ``dispatch`` is the
executor's time between kernels (its step wall time minus the kernels); the simulator spreads it
over the ops as ``kernel_overhead``.

This is how the three calibration flaws of 2026-11-24 were found (docs/validation.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from simulator.calibrate.host import NAIVE_ATTENTION
from simulator.errors import InferSimError


def predicted_ops(model: str, hardware: str | Path, batch: int, input_len: int, output_len: int,
                  phase: str) -> dict[str, float]:
    """Seconds per step of each op of ``phase`` as ``estimate`` prices it for the executor."""
    import simulator
    from validation.compare import EXECUTOR_SETTINGS

    result = simulator.estimate(model, hardware, batch=batch, input_len=input_len, output_len=output_len,
                                **EXECUTOR_SETTINGS)
    step = result.prefill if phase == "prefill" else result.decode
    if step is None:
        raise InferSimError("--phase decode needs --output-len of at least 2")
    times: dict[str, float] = {}
    for row in step.op_rows():
        name = "attention" if row["op"] in NAIVE_ATTENTION else row["op"]
        times[name] = times.get(name, 0.0) + float(row["time_s"])
    return times


def measured_ops(model: str, batch: int, input_len: int, output_len: int, repeats: int,
                 phase: str) -> tuple[dict[str, tuple[float, float]], float, float]:
    """Each op's (seconds per step, calls per step) in the executor, its step time and dispatch."""
    from validation.executor.harness import execute

    result = execute(model, batch=batch, input_len=input_len, output_len=output_len,
                     repeats=repeats).to_dict()
    ops = result["ops"][phase]
    step_s = result["ttft_s"] if phase == "prefill" else result["tpot_s"]
    dispatch = result["dispatch_s_per_step"][phase]
    return ({name: (float(v["time_s"]), float(v["kernels"])) for name, v in ops.items()}, float(step_s),
            float(dispatch))


def compare_ops(model: str, hardware: str | Path, batch: int = 1, input_len: int = 128, output_len: int = 16,
                repeats: int = 3, phase: str = "decode") -> tuple[pd.DataFrame, dict[str, float]]:
    """One row per op (measured_s, predicted_s, calls, error_s), largest absolute miss first, and the
    step totals (measured, predicted, dispatch)."""
    if phase not in ("decode", "prefill"):
        raise InferSimError(f"--phase {phase!r}: choose decode or prefill")
    predicted = predicted_ops(model, hardware, batch, input_len, output_len, phase)
    measured, step_s, dispatch = measured_ops(model, batch, input_len, output_len, repeats, phase)
    rows = []
    for name in sorted(set(predicted) | set(measured)):
        seconds, calls = measured.get(name, (0.0, 0.0))
        rows.append({"op": name, "measured_s": seconds, "predicted_s": predicted.get(name, 0.0),
                     "calls": calls})
    frame = pd.DataFrame(rows)
    frame["error_s"] = frame["predicted_s"] - frame["measured_s"]
    frame = frame.reindex(frame["error_s"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    totals = {"measured_step_s": step_s, "predicted_step_s": float(sum(predicted.values())),
              "measured_dispatch_s": dispatch}
    return frame, totals


def _print(frame: pd.DataFrame, totals: dict[str, float], title: str) -> None:
    from rich.table import Table

    from simulator.report.tables import console

    table = Table(title=title)
    for column in ("op", "calls", "measured", "predicted", "predicted - measured"):
        table.add_column(column, justify="left" if column == "op" else "right")
    for row in frame.itertuples():
        table.add_row(row.op, f"{row.calls:g}", f"{row.measured_s * 1e3:.3f} ms",
                      f"{row.predicted_s * 1e3:.3f} ms", f"{row.error_s * 1e3:+.3f} ms")
    out = console
    out.print(table)
    measured, predicted = totals["measured_step_s"], totals["predicted_step_s"]
    between = totals["measured_dispatch_s"]
    out.print(f"step: measured {measured * 1e3:.2f} ms (of which {between * 1e3:.2f} ms "
              f"between kernels), predicted {predicted * 1e3:.2f} ms ({predicted / measured - 1:+.1%})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hardware", required=True,
                        help="calibrated host spec (infersim calibrate --out ...)")
    parser.add_argument("--model", default="tiny-dense-58m", help="shipped model name or YAML path")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phase", default="decode", help="decode (default) or prefill")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        for flag in ("batch", "input_len", "output_len", "repeats"):
            if getattr(args, flag) < 1:
                raise InferSimError(f"--{flag.replace('_', '-')} must be at least 1")
        frame, totals = compare_ops(args.model, args.hardware, args.batch, args.input_len, args.output_len,
                                    args.repeats, args.phase)
    except InferSimError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"ops": frame.to_dict(orient="records"), **totals}, indent=2))
    else:
        _print(frame, totals, f"{args.model} batch {args.batch}, {args.input_len} in: {args.phase} step "
                              f"per op on {Path(args.hardware).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
