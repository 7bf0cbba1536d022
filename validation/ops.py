"""Per op, the executor's measured time beside the simulator's prediction: where a miss comes from.

    python -m validation.ops --hardware hardware_specs/local/NAME.yaml --model tiny-moe-140m \
        --batch 4 --input-len 1024 [--output-len 16] [--repeats 3] [--phase decode|prefill] [--json] \
        [--kv-bits 8|4|2 [--kv-residual N]] [--kv-policy streaming|h2o --kv-budget N [--kv-sinks N]] \
        [--expert-cache F] [--offload-layers N [--no-prefetch]]

Runs ``infersim execute`` (the executor's kernel profiler times every numeric call under the
simulator's op name) and ``estimate`` with the executor's settings (float32, eager attention) on
the host spec, and lists each op's time per step on both sides, largest miss first. The
simulator's three eager-attention ops (scores, softmax, values) are one ``attention`` call in the
executor and are summed; ops one side has and the other does not show as 0 (the executor's
``moe_permute``, for instance, is folded into the simulator's routing ops). ``dispatch`` is the
executor's time between kernels (its step wall time minus the kernels); the simulator spreads it
over the ops as ``kernel_overhead``.

The strategy options are ``validation.measure``'s ``Case`` fields: the executor runs them as
``validation.measure`` does (``Case.options()``) and ``estimate`` prices them as ``infersim
validate`` does (``validation.compare``), so a strategy case's miss can be split per op too.

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
from validation.measure import Case

# The simulator's transfer stages under the executor's op names for them.
TRANSFER_OPS = {"expert_fetch_on_demand": "expert_load", "disk_read": "weight_load"}


def predicted_ops(case: Case, hardware: str | Path, phase: str) -> tuple[dict[str, float], float]:
    """Seconds per step of each op of ``phase`` as ``estimate`` prices ``case`` for the executor, and
    the step time (less than their sum where a strategy overlaps a read with the compute)."""
    import simulator
    from validation.compare import EXECUTOR_SETTINGS, _strategy

    result = simulator.estimate(case.model, hardware, batch=case.batch, input_len=case.input_len,
                                output_len=case.output_len, check_memory=False,
                                **{**EXECUTOR_SETTINGS, **_strategy(case)})
    step = result.prefill if phase == "prefill" else result.decode
    if step is None:
        raise InferSimError("--phase decode needs --output-len of at least 2")
    times: dict[str, float] = {}
    for row in step.op_rows():
        name = "attention" if row["op"] in NAIVE_ATTENTION else row["op"]
        times[name] = times.get(name, 0.0) + float(row["time_s"])
    # A strategy's reads are stages of the step, not ops: the executor times them as ops.
    for stage, seconds in (step.transfers_s or {}).items():
        name = TRANSFER_OPS.get(stage, stage)
        times[name] = times.get(name, 0.0) + float(seconds)
    return times, float(step.time_s)


def measured_ops(case: Case, repeats: int, phase: str) -> tuple[dict[str, tuple[float, float]], float, float]:
    """Each op's (seconds per step, calls per step) in the executor, its step time and dispatch."""
    from validation.executor.harness import execute

    result = execute(case.model, batch=case.batch, input_len=case.input_len, output_len=case.output_len,
                     repeats=repeats, **case.options()).to_dict()
    ops = result["ops"][phase]
    step_s = result["ttft_s"] if phase == "prefill" else result["tpot_s"]
    dispatch = result["dispatch_s_per_step"][phase]
    return ({name: (float(v["time_s"]), float(v["kernels"])) for name, v in ops.items()}, float(step_s),
            float(dispatch))


def compare_ops(case: Case, hardware: str | Path, repeats: int = 3,
                phase: str = "decode") -> tuple[pd.DataFrame, dict[str, float]]:
    """One row per op of ``case`` (measured_s, predicted_s, calls, error_s), largest absolute miss
    first, and the step totals (measured, predicted, dispatch)."""
    if phase not in ("decode", "prefill"):
        raise InferSimError(f"--phase {phase!r}: choose decode or prefill")
    predicted, predicted_step = predicted_ops(case, hardware, phase)
    measured, step_s, dispatch = measured_ops(case, repeats, phase)
    rows = []
    for name in sorted(set(predicted) | set(measured)):
        seconds, calls = measured.get(name, (0.0, 0.0))
        rows.append({"op": name, "measured_s": seconds, "predicted_s": predicted.get(name, 0.0),
                     "calls": calls})
    frame = pd.DataFrame(rows)
    frame["error_s"] = frame["predicted_s"] - frame["measured_s"]
    frame = frame.reindex(frame["error_s"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    totals = {"measured_step_s": step_s, "predicted_step_s": predicted_step,
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
    strategy = parser.add_argument_group("strategies (as validation.measure's cases run them)")
    strategy.add_argument("--kv-bits", type=int, default=0, help="KIVI-quantized KV cache: 8, 4 or 2 bits")
    strategy.add_argument("--kv-residual", type=int, default=0, help="recent tokens kept float32 beside it")
    strategy.add_argument("--kv-policy", default="", help="streaming or h2o eviction")
    strategy.add_argument("--kv-budget", type=int, default=0, help="tokens the evicting cache keeps")
    strategy.add_argument("--kv-sinks", type=int, default=4, help="streaming's attention sinks")
    strategy.add_argument("--expert-cache", type=float, default=None,
                          help="MoE: fraction of each layer's experts in memory, the rest on disk")
    strategy.add_argument("--offload-layers", type=int, default=0, help="the last layers' weights on disk")
    strategy.add_argument("--no-prefetch", action="store_true", help="offloaded layers read without a reader")
    args = parser.parse_args(argv)
    try:
        for flag in ("batch", "input_len", "output_len", "repeats"):
            if getattr(args, flag) < 1:
                raise InferSimError(f"--{flag.replace('_', '-')} must be at least 1")
        case = Case(args.model, args.batch, args.input_len, args.output_len,
                    offload_layers=args.offload_layers, prefetch=not args.no_prefetch,
                    kv_policy=args.kv_policy, kv_budget=args.kv_budget, kv_sinks=args.kv_sinks,
                    kv_bits=args.kv_bits, kv_residual=args.kv_residual, expert_cache=args.expert_cache)
        frame, totals = compare_ops(case, args.hardware, args.repeats, args.phase)
    except InferSimError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"ops": frame.to_dict(orient="records"), **totals}, indent=2))
    else:
        _print(frame, totals, f"{case.key}: {args.phase} step per op on {Path(args.hardware).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
