"""Predicted vs measured for executor runs: `infersim validate`.

    infersim validate --measurements validation/measurements/FILE.csv \
        --hardware hardware_specs/local/NAME.yaml [--max-median-error 0.10] [--max-p90-error 0.20] \
        [--report docs/validation/NAME.md]

Every measured case is predicted with ``simulator.estimate`` on the given
hardware spec, with the executor's own settings (float32 weights, KV cache
and activations; naive attention, which materialises the score matrix as the
numpy executor does). Errors are ``predicted / measured - 1`` of TTFT and
TPOT against the fastest round's median (``*_best_s``, the undisturbed
machine, as calibration keeps each microbenchmark's fastest pass), or against
the median of all repeats in files measured before rounds existed. The error
against the median of all runs and the noise (coefficient of variation over
all runs, between-round drift included) are reported beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simulator.errors import InferSimError
from simulator.estimate import estimate
from simulator.specs.loader import load_model, load_system
from simulator.strategies.kv import KVPolicy
from simulator.strategies.offload import OffloadPlan
from simulator.strategies.parallel import ParallelPlan
from simulator.strategies.speculative import Speculation, acceptance_for

REQUIRED = ["case", "model", "batch", "input_len", "output_len", "ttft_median_s", "tpot_median_s"]
EXECUTOR_SETTINGS = {"weight_dtype": "fp32", "kv_dtype": "fp32", "act_dtype": "fp32", "attention": "naive"}


def read_measurements(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InferSimError(f"{path}: cannot read measurements: {err}") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise InferSimError(f"{path}: missing columns {', '.join(missing)}")
    return frame


def _number(row: Any, name: str) -> float | None:
    """A numeric column's value; ``None`` where the file lacks the column or the cell is empty."""
    value = getattr(row, name, None)
    if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
        return None
    return float(value)


def _strategy(row: Any) -> dict[str, Any]:
    """The executor's strategy columns as ``estimate`` options (absent or 0: none); they replace
    ``EXECUTOR_SETTINGS`` where both name one (a quantized ``kv_dtype``)."""
    options: dict[str, Any] = {}
    layers = int(getattr(row, "offload_layers", 0) or 0)
    if layers:
        spec = load_model(row.model)
        prefetch = str(getattr(row, "prefetch", True)).lower() not in ("false", "0", "0.0")
        options["offload"] = OffloadPlan(weights_disk=layers / spec.num_layers, prefetch=prefetch)
    window = int(getattr(row, "kv_window", 0) or 0)
    if window:
        options["kv_policy"] = KVPolicy("window", window)
    policy = getattr(row, "kv_policy", "")
    if isinstance(policy, str) and policy:
        options["kv_policy"] = KVPolicy.chosen(policy, _number(row, "kv_budget"),
                                               int(_number(row, "kv_sinks") or 0))
    bits = int(_number(row, "kv_bits") or 0)
    if bits:  # KIVI: the executor's codes, scales in groups of the default size, a float32 residual
        options.update(kv_dtype=f"int{bits}", kv_residual=int(_number(row, "kv_residual") or 0))
    fraction = _number(row, "expert_cache")
    if fraction is not None:
        options["offload"] = OffloadPlan.build(load_model(row.model), expert_cache=fraction)
    degrees = {name: int(getattr(row, name, 1) or 1) for name in ("tp", "ep", "pp", "micro_batches")}
    if any(value > 1 for value in degrees.values()):
        # The executor drains its pipeline every step.
        options["parallel"] = ParallelPlan(**degrees, schedule="gpipe")
    draft = getattr(row, "draft", "")
    if isinstance(draft, str) and draft:
        gamma = int(row.gamma)
        # Acceptance is an input, set by the executor's seeded rule: predict with the rate that
        # gives the tokens per round the run drew (its last round truncated), not the nominal one.
        drawn = float(getattr(row, "tokens_per_round", 0) or 0)
        alpha = acceptance_for(drawn, gamma) if drawn else float(row.alpha)
        options["speculative"] = Speculation(draft, gamma, alpha)
    return options


def predict(frame: pd.DataFrame, hardware: str | Path) -> pd.DataFrame:
    system = load_system(hardware)
    rows = []
    for row in frame.itertuples():
        result = estimate(row.model, system, batch=int(row.batch), input_len=int(row.input_len),
                          output_len=int(row.output_len), check_memory=False,
                          **{**EXECUTOR_SETTINGS, **_strategy(row)})
        rows.append({"ttft_pred_s": result.ttft_s, "tpot_pred_s": result.tpot_s})
    out = pd.concat([frame.reset_index(drop=True), pd.DataFrame(rows)], axis=1)
    for metric in ("ttft", "tpot"):
        best = f"{metric}_best_s"
        out[f"{metric}_measured_s"] = out[best] if best in out.columns else out[f"{metric}_median_s"]
        out[f"{metric}_error"] = out[f"{metric}_pred_s"] / out[f"{metric}_measured_s"] - 1.0
        out[f"{metric}_error_vs_median"] = out[f"{metric}_pred_s"] / out[f"{metric}_median_s"] - 1.0
    return out


def summarize(frame: pd.DataFrame) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for metric in ("ttft", "tpot"):
        errors = frame[f"{metric}_error"].abs()
        vs_median = frame[f"{metric}_error_vs_median"].abs()
        noise = frame.get(f"{metric}_cv", pd.Series(dtype=float))
        summary[metric] = {
            "median_abs_error": float(errors.median()),
            "p90_abs_error": float(errors.quantile(0.9)),
            "median_abs_error_vs_median_run": float(vs_median.median()),
            "p90_abs_error_vs_median_run": float(vs_median.quantile(0.9)),
            "median_noise_cv": float(noise.median()) if len(noise) else None,
            "cases": int(errors.size),
        }
    return summary


def machine_speed(frame: pd.DataFrame, hardware: str | Path) -> dict[str, float] | None:
    """The host's GEMM rate while measuring (the kept rounds' probes, median) against the rate
    its calibration measured; None where either is not recorded."""
    if "host_gflops" not in frame.columns or frame["host_gflops"].isna().all():
        return None
    fit = load_system(hardware).device.efficiency.fit or {}
    calibrated = fit.get("measured_peak_flops")
    if not calibrated:
        return None
    measured = float(frame["host_gflops"].median()) * 1e9
    return {"measured_gflops": measured / 1e9, "calibrated_gflops": float(calibrated) / 1e9,
            "ratio": measured / float(calibrated)}


def speed_line(speed: dict[str, float]) -> str:
    line = (f"Machine speed: GEMM rate {speed['measured_gflops']:.0f} GFLOPS while measuring (median "
            f"of the kept rounds' probes) against {speed['calibrated_gflops']:.0f} at calibration "
            f"({speed['ratio'] - 1:+.0%}).")
    if abs(speed["ratio"] - 1) > 0.10:
        line += " More than 10% apart: the errors include the machine's drift; calibrate anew."
    return line


def report_markdown(frame: pd.DataFrame, summary: dict[str, Any], measurements: Path,
                    hardware: str) -> str:
    lines = [f"# Executor validation: `{measurements}` on `{hardware}`", "",
             "Measured = the fastest round's median where the file has rounds; the last two",
             "error columns are against the median of all runs instead.", "",
             "| metric | median abs error | p90 abs error | median noise (CV) | cases "
             "| median vs all runs | p90 vs all runs |",
             "|---|---|---|---|---|---|---|"]
    for metric, s in summary.items():
        noise = f"{s['median_noise_cv']:.1%}" if s["median_noise_cv"] is not None else "-"
        lines.append(f"| {metric.upper()} | {s['median_abs_error']:.1%} | {s['p90_abs_error']:.1%} | "
                     f"{noise} | {s['cases']} | {s['median_abs_error_vs_median_run']:.1%} "
                     f"| {s['p90_abs_error_vs_median_run']:.1%} |")
    lines += ["", "| case | TTFT measured | predicted | error | TPOT measured | predicted | error |",
              "|---|---|---|---|---|---|---|"]
    speed = machine_speed(frame, hardware)
    if speed is not None:
        lines[4:4] = [speed_line(speed), ""]
    for row in frame.itertuples():
        lines.append(
            f"| {row.case} | {row.ttft_measured_s * 1e3:.2f} ms | {row.ttft_pred_s * 1e3:.2f} ms | "
            f"{row.ttft_error:+.1%} | {row.tpot_measured_s * 1e3:.2f} ms | {row.tpot_pred_s * 1e3:.2f} ms | "
            f"{row.tpot_error:+.1%} |")
    return "\n".join(lines) + "\n"


def validate(measurements: Path, hardware: str, max_median: float | None, max_p90: float | None,
             report: Path | None) -> int:
    frame = predict(read_measurements(measurements), hardware)
    summary = summarize(frame)
    from rich.table import Table

    from simulator.report.tables import console
    table = Table(title=f"predicted vs measured: {measurements.name} on {Path(hardware).stem}")
    for col in ("case", "TTFT meas", "pred", "err", "cv", "TPOT meas", "pred", "err", "cv"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for row in frame.itertuples():
        table.add_row(row.case, f"{row.ttft_measured_s * 1e3:.2f} ms", f"{row.ttft_pred_s * 1e3:.2f} ms",
                      f"{row.ttft_error:+.1%}", f"{getattr(row, 'ttft_cv', np.nan):.1%}",
                      f"{row.tpot_measured_s * 1e3:.2f} ms", f"{row.tpot_pred_s * 1e3:.2f} ms",
                      f"{row.tpot_error:+.1%}", f"{getattr(row, 'tpot_cv', np.nan):.1%}")
    console.print(table)
    failed = False
    for metric, s in summary.items():
        console.print(f"{metric.upper()}: median |error| {s['median_abs_error']:.1%}, "
                      f"p90 {s['p90_abs_error']:.1%} over {s['cases']} cases "
                      f"(median noise {s['median_noise_cv'] or 0:.1%}; against the median of all "
                      f"runs {s['median_abs_error_vs_median_run']:.1%}, "
                      f"p90 {s['p90_abs_error_vs_median_run']:.1%})")
        if max_median is not None and s["median_abs_error"] > max_median:
            console.print(f"[red]{metric.upper()} median error exceeds {max_median:.0%}[/red]")
            failed = True
        if max_p90 is not None and s["p90_abs_error"] > max_p90:
            console.print(f"[red]{metric.upper()} p90 error exceeds {max_p90:.0%}[/red]")
            failed = True
    speed = machine_speed(frame, hardware)
    if speed is not None:
        console.print(speed_line(speed))
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(report_markdown(frame, summary, measurements, hardware))
        console.print(f"wrote {report}")
    return 1 if failed else 0
