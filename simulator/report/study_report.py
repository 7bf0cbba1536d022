"""A study's report: what a sweep's table says, as PNGs and a ``summary.md`` that links them.

``write_report(study, out_dir)`` reads the table ``infersim sweep`` (or ``simulator.sweep``) wrote
and draws

- ``pareto.png``: throughput per device against per-user speed (1 / TPOT), every feasible
  configuration faint and coloured by plan (the options that are not the workload: model,
  hardware, tp, ...), the Pareto front over them (``study.pareto.pareto_front``);
- ``latency_breakdown.png``: the prefill step (TTFT) and the mean decode step (TPOT) of the top
  plans, stacked by kind of op; the table has no per-op columns, so each plan shown is run
  through ``estimate`` again (``study.options.estimate_call``, the sweep's own mapping);
- ``memory_breakdown.png``: weights, KV cache and activations per device of the same plans;
- ``roofline.png``: each device's roofline with those plans' prefill and decode steps on it
  (FLOPs of the step over its bytes, and over its modelled time);
- ``heatmap.png``: one output column over two axes (batch x input length by default), one panel
  per value of the other options that vary, infeasible cells hatched;
- ``summary.md``: the study's size, the reasons configurations are infeasible, the top plans
  by the first objective, and the plots.

The top plans are the best configuration of each plan, ranked by the first objective (ties to
the second, then fewer devices); a study with fewer plans than asked for fills the list with
its next best configurations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from simulator.errors import InferSimError  # noqa: E402
from simulator.result import EstimateResult  # noqa: E402

DEFAULT_OBJECTIVES = {"throughput_per_device": "max", "tokens_per_s_per_user": "max"}
"""The Pareto plot's axes, the first also ranking the top plans."""
OBJECTIVE_ALIASES = {"per_user": ("tokens_per_s_per_user", "max"),
                     "user_speed": ("tokens_per_s_per_user", "max")}
WORKLOAD = ("batch", "input_len", "output_len")
"""Options that describe the requests, not the plan serving them."""
PLAN_ORDER = ("model", "hardware", "tp", "pp", "ep", "dp")
CATEGORIES = ("attention and KV cache", "GEMMs / projections", "MLP / experts", "norms and elementwise",
              "communication and transfers (exposed)", "other")
CATEGORY_COLOURS = dict(zip(CATEGORIES, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"),
                            strict=True))
MAX_PLOTTED = 8
"""Plans drawn in the breakdowns and the roofline (more bars stop being readable)."""
MAX_PANELS = 16
"""Heat-map panels (one per value of the other varying options) drawn at most."""
LABELS = {"ttft_s": "TTFT (s)", "tpot_s": "TPOT (s)", "e2e_s": "end-to-end latency (s)",
          "throughput_tokens_per_s": "throughput (output tokens/s)",
          "throughput_per_device": "throughput per device (output tokens/s)",
          "tokens_per_s_per_user": "per-user speed (output tokens/s, 1 / TPOT)",
          "cost_usd_per_million_tokens": "cost (USD per million output tokens)",
          "energy_j_per_token": "energy (J per output token)", "energy_j": "energy (J)",
          "power_w": "mean power (W)", "devices": "devices",
          "memory_bytes_total": "memory per device (bytes)", "batch": "batch (sequences)",
          "input_len": "input length (tokens)", "output_len": "output length (tokens)"}
HEADERS = {"ttft_s": "TTFT", "tpot_s": "TPOT", "throughput_tokens_per_s": "tok/s",
           "throughput_per_device": "tok/s/device", "tokens_per_s_per_user": "tok/s/user",
           "cost_usd_per_million_tokens": "$/M tok", "input_len": "in", "output_len": "out",
           "memory_bytes_total": "memory/device"}
FILES = {"pareto": "pareto.png", "latency": "latency_breakdown.png", "memory": "memory_breakdown.png",
         "roofline": "roofline.png", "heatmap": "heatmap.png", "front": "pareto_front.csv",
         "summary": "summary.md"}


# --- the study table ---------------------------------------------------------------------------

def load_study(study: pd.DataFrame | str | Path) -> tuple[pd.DataFrame, str]:
    """The study's rows and a name for them; a one-line error for a missing or unreadable file,
    a table that is not a study (no ``feasible`` column), or one without a feasible row."""
    if isinstance(study, pd.DataFrame):
        frame, source = study.copy(), "the study"
    else:
        path = Path(study)
        source = str(path)
        if not path.is_file():
            raise InferSimError(f"{path}: no such file (give the .parquet or .csv infersim sweep wrote)")
        if path.suffix not in (".parquet", ".csv"):
            raise InferSimError(f"{path}: a study is a .parquet or .csv table written by infersim sweep")
        try:
            frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        except Exception as err:  # noqa: BLE001 - any reader failure is the same user error
            first = str(err).splitlines()[0] if str(err) else ""
            raise InferSimError(f"{path}: cannot be read as a {path.suffix[1:]} table "
                                f"({type(err).__name__}: {first})") from None
    if "feasible" not in frame:
        raise InferSimError(f"{source} is not a study table: it has no 'feasible' column "
                            "(write one with infersim sweep FILE --out STUDY.parquet)")
    needed = ("model", "hardware", "batch", "tpot_s", "throughput_tokens_per_s")
    missing = [c for c in needed if c not in frame]
    if missing:
        raise InferSimError(f"{source} is not a study table: it lacks {', '.join(missing)} "
                            "(write one with infersim sweep FILE --out STUDY.parquet)")
    frame["feasible"] = _as_bool(frame["feasible"], source)
    if not frame["feasible"].any():
        reasons = _reason_counts(frame)
        common = f"; most common reason: {reasons.index[0]}" if len(reasons) else ""
        raise InferSimError(f"{source}: none of its {len(frame):,} configurations is feasible{common}")
    return frame, source


def _as_bool(column: pd.Series, source: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(column):
        return column.astype(bool)
    text = column.astype(str).str.strip().str.lower()
    known = text.isin(("true", "false", "1", "0", "1.0", "0.0"))
    if not known.all():
        raise InferSimError(f"{source}: column 'feasible' holds {column[~known].iloc[0]!r}, not true/false")
    return text.isin(("true", "1", "1.0"))


def option_columns(frame: pd.DataFrame) -> list[str]:
    """The configuration's options: the columns before ``feasible`` (the order sweeps write)."""
    return list(frame.columns[:list(frame.columns).index("feasible")])


def distinct(frame: pd.DataFrame) -> dict[str, int]:
    """Distinct values of each option ("not set" counts as one), over the rows that have numbers:
    a configuration that raised keeps its resolved ``kv_dtype`` empty, which is no variation."""
    costed = frame[pd.to_numeric(frame["tpot_s"], errors="coerce").notna()]
    rows = costed if len(costed) else frame
    return {c: int(rows[c].nunique(dropna=False)) for c in option_columns(frame)}


def plan_columns(frame: pd.DataFrame) -> list[str]:
    """The options that vary and are not the workload (model, hardware, tp, ...); model and
    hardware when nothing varies."""
    options = [c for c in option_columns(frame) if c not in WORKLOAD]
    counts = distinct(frame)
    varying = [c for c in options if counts[c] > 1]
    ordered = [c for c in PLAN_ORDER if c in varying] + [c for c in varying if c not in PLAN_ORDER]
    return ordered or [c for c in ("model", "hardware") if c in frame]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _value(column: str, value: Any) -> str:
    if _missing(value):
        return f"no {column}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if column in ("model", "hardware"):
        return str(value)
    return f"{column} {value}"


def plan_label(columns: Sequence[str], values: Sequence[Any]) -> str:
    """The options' values, leaving out strategies at ``infersim estimate``'s default (model,
    hardware, tp, pp and the workload always shown)."""
    from simulator.study.options import defaults

    default = defaults()
    always = ("model", "hardware", "tp", "pp", *WORKLOAD)
    parts = [_value(c, v) for c, v in zip(columns, values, strict=True)
             if c in always or not (_missing(v) or v == default.get(c, object()))]
    return ", ".join(parts)


def prepare(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``devices``, ``throughput_per_device``, ``tokens_per_s_per_user`` (1 / TPOT)
    and ``plan`` (a label of the plan's varying options)."""
    from simulator.study.pareto import with_derived

    out = with_derived(frame)
    tpot = pd.to_numeric(out["tpot_s"], errors="coerce")
    out["tokens_per_s_per_user"] = 1.0 / tpot.where(tpot > 0)
    columns = plan_columns(out)
    out["plan"] = [plan_label(columns, values) for values in out[columns].itertuples(index=False, name=None)]
    return out


def resolve_objectives(objectives: Mapping[str, str] | str | None, frame: pd.DataFrame,
                       flag: str = "--objectives") -> dict[str, str]:
    """Two objectives (column -> min/max): the Pareto plot's x and y, the first ranking the top
    plans. Short names as ``infersim sweep --pareto`` (``cost``, ``throughput_per_device``,
    ``tpot``, ...) and ``per_user`` for ``tokens_per_s_per_user``."""
    from simulator.study.pareto import parse_objectives

    if objectives is None:
        chosen = dict(DEFAULT_OBJECTIVES)
    elif isinstance(objectives, str):
        parts = []
        for item in filter(None, (p.strip() for p in objectives.split(","))):
            name, _, direction = item.partition(":")
            column, default = OBJECTIVE_ALIASES.get(name, (name, ""))
            parts.append(f"{column}:{direction or default}" if direction or default else column)
        chosen = parse_objectives(",".join(parts), flag)
    else:
        chosen = dict(objectives)
    if len(chosen) != 2:
        raise InferSimError(f"{flag} names {len(chosen)} objective(s); give two, as COLUMN:min|max,"
                            "COLUMN:min|max (the Pareto plot's axes; the first ranks the top plans)")
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])
               and not pd.api.types.is_bool_dtype(frame[c])]
    for column, direction in chosen.items():
        if direction not in ("min", "max"):
            raise InferSimError(f"{flag} {column}: the direction is min or max, got {direction!r}")
        if column not in numeric:
            raise InferSimError(f"{flag}: {column!r} is not a numeric column of the study "
                                f"(for example {', '.join(numeric[:12])}, ...)")
    return chosen


def top_plans(frame: pd.DataFrame, objectives: Mapping[str, str], count: int) -> pd.DataFrame:
    """Each plan's best feasible configuration, best first by the objectives (then fewer
    devices); filled with the next best configurations when there are fewer plans than ``count``."""
    (first, first_dir), (second, second_dir) = objectives.items()
    feasible = frame[frame["feasible"] & pd.to_numeric(frame[first], errors="coerce").notna()]
    order = list(dict.fromkeys([first, second, "devices"]))
    ascending = [first_dir == "min", second_dir == "min", True][:len(order)]
    ranked = feasible.sort_values(order, ascending=ascending, kind="stable", na_position="last")
    best = ranked.drop_duplicates("plan").head(count)
    if len(best) < count:
        rest = ranked.drop(index=best.index).head(count - len(best))
        best = ranked.loc[ranked.index.isin(best.index.union(rest.index))]
    return best


# --- re-running the plans shown ----------------------------------------------------------------

def rerun(rows: pd.DataFrame, options: Sequence[str]) -> list[EstimateResult]:
    """``estimate`` for each row, with the options the sweep gave it."""
    from simulator.estimate import estimate
    from simulator.study.options import estimate_call, from_rows

    given = rows[list(options)].astype(object).where(rows[list(options)].notna(), None)
    records = [{k: v for k, v in r.items() if v is not None} for r in given.to_dict(orient="records")]
    configs = from_rows(records, source="study row")
    results = []
    for position, config in enumerate(configs.to_dict(orient="records")):
        config = {k: (None if isinstance(v, float) and math.isnan(v)
                      else v.item() if isinstance(v, np.generic) else v) for k, v in config.items()}
        model, hardware, kwargs = estimate_call(config)
        try:
            results.append(estimate(model, hardware, **kwargs))
        except InferSimError as err:
            raise InferSimError(f"study row {rows.index[position]} no longer estimates: {err}") from None
    return results


def op_category(name: str, kind: str) -> str:
    """The breakdown's category of one op (by its graph name and kernel kind)."""
    if name.startswith(("mlp_", "experts_", "shared_experts_", "router", "topk_gate", "expert_")):
        return "MLP / experts"
    if kind == "gemm":
        return "GEMMs / projections"
    if kind in ("attention", "softmax", "cache_write", "unpack", "dequantize") \
            or name.startswith(("kv_", "h2o")):
        return "attention and KV cache"
    if kind in ("norm", "elementwise", "rope", "activation"):
        return "norms and elementwise"
    return "other"


def breakdown(result: EstimateResult) -> dict[str, dict[str, float]]:
    """Seconds per category of each phase's step (decode: the mean step); what the step takes
    beyond its ops (collectives, pipeline bubbles, transfers not hidden) is the exposed share."""
    frame = result.ops_frame()
    out: dict[str, dict[str, float]] = {}
    for phase in (result.prefill, result.decode):
        if phase is None:
            continue
        ops = frame[frame["phase"] == phase.phase]
        seconds = dict.fromkeys(CATEGORIES, 0.0)
        for name, kind, time_s in ops[["op", "kind", "time_s"]].itertuples(index=False, name=None):
            seconds[op_category(name, kind)] += float(time_s)
        beyond = phase.time_s - float(ops["time_s"].sum())
        if phase.communication_s is not None or phase.transfers_s is not None:
            seconds["communication and transfers (exposed)"] += max(beyond, 0.0)
        else:
            seconds["other"] += max(beyond, 0.0)
        out[phase.phase] = seconds
    return out


def step_point(result: EstimateResult, phase: str) -> tuple[float, float] | None:
    """(FLOP per byte, achieved FLOP/s) of one step: its ops' FLOPs over their bytes, and over
    the step's modelled time."""
    frame = result.ops_frame()
    ops = frame[frame["phase"] == phase]
    step = result.prefill if phase == "prefill" else result.decode
    flops, nbytes = float(ops["flops"].sum()), float(ops["bytes"].sum())
    if step is None or flops <= 0 or nbytes <= 0 or step.time_s <= 0:
        return None
    return flops / nbytes, flops / step.time_s


# --- plots -------------------------------------------------------------------------------------

def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plan_colours(plans: Sequence[str]) -> dict[str, Any]:
    """A colour per plan: tab10, or for more plans tab20's ten strong colours before its pale ones."""
    names = sorted(set(plans))
    if len(names) <= 10:
        return {name: plt.get_cmap("tab10")(k) for k, name in enumerate(names)}
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {name: plt.get_cmap("tab20")(order[k % 20]) for k, name in enumerate(names)}


def _wrap(label: str, width: int) -> str:
    """A label of ``a, b, c`` parts on lines of about ``width`` characters, never inside a part."""
    lines: list[str] = []
    for part in label.split(", "):
        if lines and len(lines[-1]) + len(part) + 2 <= width:
            lines[-1] += f", {part}"
        else:
            lines.append(part)
    return ",\n".join(lines)


def _short(row: pd.Series) -> str:
    return f"{_wrap(row['plan'], 24)}\nbatch {row['batch']}, {row.get('input_len', '?')} in"


def plot_latency(shown: pd.DataFrame, results: Sequence[EstimateResult], path: Path) -> Path:
    parts = [breakdown(r) for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 3.2 * len(shown) + 2), 5.5))
    labels = [f"#{k}\n{_short(row)}" for k, (_, row) in enumerate(shown.iterrows(), start=1)]
    x = np.arange(len(shown))
    for ax, phase, title in zip(axes, ("prefill", "decode"),
                                ("prefill step (TTFT)", "mean decode step (TPOT)"), strict=True):
        bottom = np.zeros(len(shown))
        for category in CATEGORIES:
            ms = np.array([p.get(phase, {}).get(category, 0.0) * 1e3 for p in parts])
            if not ms.any():
                continue
            ax.bar(x, ms, bottom=bottom, color=CATEGORY_COLOURS[category], label=category, width=0.7)
            bottom += ms
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("time per step (ms)")
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=min(len(handles), 3), fontsize=8,
               bbox_to_anchor=(0.5, 1.0))
    fig.suptitle("Latency by kind of op of the top plans (modelled; decode is the mean step)", y=1.06)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_memory(shown: pd.DataFrame, results: Sequence[EstimateResult], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(7.5, 1.7 * len(shown) + 3), 5))
    x = np.arange(len(shown))
    bottom = np.zeros(len(shown))
    for name, label, colour in (("weights", "weights", "#4c72b0"), ("kv_cache", "KV cache", "#dd8452"),
                                ("activations", "activations", "#55a868")):
        gb = np.array([getattr(r.memory, name) / 1e9 for r in results])
        ax.bar(x, gb, bottom=bottom, color=colour, width=0.6, label=label)
        bottom += gb
    capacity = np.array([r.memory.capacity / 1e9 for r in results])
    ax.hlines(capacity, x - 0.4, x + 0.4, colors="black", linestyles="--", label="device capacity")
    ax.set_xticks(x, [f"#{k}\n{_short(row)}" for k, (_, row) in enumerate(shown.iterrows(), start=1)],
                  fontsize=7)
    ax.set_ylabel("memory per device (GB)")
    ax.set_title("Memory per device of the top plans")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_roofline(shown: pd.DataFrame, results: Sequence[EstimateResult], colours: Mapping[str, Any],
                  path: Path) -> Path:
    from simulator.report.roofline_plot import draw_roofs
    from simulator.specs.loader import load_system

    devices: dict[str, Any] = {}
    for result in results:
        device = load_system(result.hardware).device
        devices.setdefault(device.name, (device, result.precision.compute))
    fig, axes = plt.subplots(1, len(devices), figsize=(7.5 * len(devices), 6), squeeze=False)
    panel = {name: ax for name, ax in zip(devices, axes[0], strict=True)}
    for name, (device, compute) in devices.items():
        draw_roofs(panel[name], device, compute)
    markers = {"prefill": "o", "decode": "^"}
    points: dict[str, list[tuple[float, float]]] = {name: [] for name in devices}
    for k, ((_, row), result) in enumerate(zip(shown.iterrows(), results, strict=True), start=1):
        device = load_system(result.hardware).device.name
        ax = panel[device]
        for phase, marker in markers.items():
            point = step_point(result, phase)
            if point is None:
                continue
            points[device].append(point)
            ax.scatter(point[0], point[1] / 1e12, marker=marker, s=70, color=colours[row["plan"]],
                       edgecolors="black", linewidths=0.5, zorder=3)
            ax.annotate(f"#{k}", (point[0], point[1] / 1e12), textcoords="offset points", xytext=(5, 4),
                        fontsize=7)
    for name, ax in panel.items():
        plotted = [row["plan"] for (_, row), r in zip(shown.iterrows(), results, strict=True)
                   if load_system(r.hardware).device.name == name]
        for plan in dict.fromkeys(plotted):
            ax.scatter([], [], color=colours[plan], label=plan)
        for phase, marker in markers.items():
            ax.scatter([], [], marker=marker, color="white", edgecolors="black", label=f"{phase} step")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if points[name]:  # two decades either side of the steps, the roofs' knee included
            device, _ = devices[name]
            knee = max(device.compute.values()) / device.main_memory.bandwidth
            low = min(min(p[0] for p in points[name]), knee)
            high = max(max(p[0] for p in points[name]), knee)
            ax.set_xlim(low / 100, high * 100)
            ax.set_ylim(min(p[1] for p in points[name]) / 1e12 / 100, max(device.compute.values()) / 1e12 * 3)
        ax.set_xlabel("arithmetic intensity of the step (FLOP / byte of device memory)")
        ax.set_ylabel("achieved TFLOP/s per device (modelled)")
        ax.set_title(f"{name}: steps of the top plans (#k = rank)")
        ax.grid(True, which="major", alpha=0.3)  # minor log grid lines cost seconds to lay out
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def default_heatmap_axes(frame: pd.DataFrame) -> tuple[str, str] | None:
    """batch x input_len when both vary, else the two varying options with the most values."""
    options = option_columns(frame)
    counts = distinct(frame)
    if counts.get("batch", 0) > 1 and counts.get("input_len", 0) > 1:
        return "batch", "input_len"
    varying = sorted((c for c in options if counts[c] > 1), key=lambda c: (-counts[c], options.index(c)))
    return (varying[0], varying[1]) if len(varying) >= 2 else None


def resolve_heatmap(spec: str | Sequence[str] | None, frame: pd.DataFrame,
                    flag: str = "--heatmap") -> tuple[str, str, str] | None:
    """``X,Y,COLUMN`` (X or Y may be empty for the default axes) or ``None`` for the default."""
    if spec is None:
        axes = default_heatmap_axes(frame)
        return None if axes is None else (*axes, "throughput_tokens_per_s")
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p) for p in spec]
    if len(parts) != 3 or not parts[2]:
        raise InferSimError(f"{flag} {spec!r}: give X,Y,COLUMN, for example batch,input_len,ttft_s")
    x, y, column = parts
    if not x or not y:
        axes = default_heatmap_axes(frame)
        if axes is None:
            raise InferSimError(f"{flag} {spec!r}: fewer than two options vary in the study; name X and Y")
        x, y = axes
    for name, what in ((x, "X"), (y, "Y"), (column, "COLUMN")):
        if name not in frame:
            raise InferSimError(f"{flag}: {what} {name!r} is not a column of the study "
                                f"(options: {', '.join(option_columns(frame))})")
    if x == y:
        raise InferSimError(f"{flag}: X and Y are both {x!r}; name two different columns")
    if not pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column]):
        raise InferSimError(f"{flag}: COLUMN {column!r} is not numeric; give an output such as "
                            "throughput_tokens_per_s, ttft_s, tpot_s or cost_usd_per_million_tokens")
    return x, y, column


def _label(column: str) -> str:
    if column in LABELS:
        return LABELS[column]
    for suffix, unit in (("_s", "s"), ("_bytes", "bytes"), ("_j", "J"), ("_w", "W")):
        if column.endswith(suffix):
            return f"{column} ({unit})"
    return column


def _fmt(value: float) -> str:
    if not np.isfinite(value):
        return ""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def plot_heatmap(frame: pd.DataFrame, x: str, y: str, column: str, path: Path) -> tuple[Path, str]:
    """One panel per combination of the other varying options; a note says which were left out."""
    counts = distinct(frame)
    others = [c for c in option_columns(frame) if c not in (x, y) and counts[c] > 1]
    panels = list(frame.groupby(others, sort=True, dropna=False)) if others else [((), frame)]
    note = ""
    if len(panels) > MAX_PANELS:
        note = f"first {MAX_PANELS} of {len(panels)} panels ({', '.join(others)}) shown"
        panels = panels[:MAX_PANELS]
    xs = sorted(frame[x].dropna().unique().tolist())
    ys = sorted(frame[y].dropna().unique().tolist())
    values = pd.to_numeric(frame[column], errors="coerce")
    shown = values[frame["feasible"] & values.notna()]
    label = _label(column)
    scale = 1.0
    if label.endswith("(s)") and len(shown) and shown.abs().max() < 1:  # sub-second times in ms
        scale, label = 1e3, label[:-3] + "(ms)"
    shown = shown * scale
    positive = len(shown) and shown.min() > 0
    norm = (LogNorm(shown.min(), shown.max()) if positive and shown.max() / shown.min() > 20
            else Normalize(shown.min() if len(shown) else 0.0, shown.max() if len(shown) else 1.0))
    columns = min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    cell_w, cell_h = 0.5 if len(xs) <= 16 else 0.18, 0.45
    width = min(max(4.5, len(xs) * cell_w + 1.5), 9.0)
    height = max(2.6, len(ys) * cell_h + 1.6)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns + 1.2, height * rows + 0.8),
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    annotate = len(xs) * len(ys) <= 80
    image = None
    for ax, (key, rows_) in zip(axes.flat, panels, strict=False):
        grid = np.full((len(ys), len(xs)), np.nan)
        infeasible = np.zeros_like(grid, dtype=bool)
        cells = pd.to_numeric(rows_[column], errors="coerce") * scale
        for xv, yv, value, ok in zip(rows_[x], rows_[y], cells, rows_["feasible"], strict=True):
            if not (pd.notna(xv) and pd.notna(yv)):
                continue
            i, j = ys.index(yv), xs.index(xv)
            if ok and np.isfinite(value):
                grid[i, j] = value
            elif not ok:
                infeasible[i, j] = True
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", origin="lower")
        for i, j in zip(*np.nonzero(infeasible), strict=True):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", edgecolor="0.5", hatch="///",
                                   linewidth=0.3))
        if annotate:
            for i, j in zip(*np.nonzero(np.isfinite(grid)), strict=True):
                level = norm(grid[i, j])
                ax.text(j, i, _fmt(grid[i, j]), ha="center", va="center", fontsize=6,
                        color="black" if level > 0.6 else "white")
        step = max(1, math.ceil(len(xs) / 16))
        ax.set_xticks(range(0, len(xs), step), [str(v) for v in xs[::step]], fontsize=7,
                      rotation=90 if len(xs) > 8 else 0)
        ax.set_yticks(range(len(ys)), [str(v) for v in ys], fontsize=7)
        key = key if isinstance(key, tuple) else (key,)
        ax.set_title(_wrap(plan_label(others, key), 70) or column, fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.85)
        bar.set_label(label)
    fig.supxlabel(_label(x), fontsize=9)
    fig.supylabel(_label(y), fontsize=9)
    fig.legend(handles=[Patch(facecolor="0.85", edgecolor="0.5", hatch="///",
                              label="infeasible (does not fit, or raises)"),
                        Patch(facecolor="white", edgecolor="0.5", label="not in the study")],
               loc="outside lower right", fontsize=8, ncol=2)
    fig.suptitle(f"{label} over {x} and {y}" + (f" ({note})" if note else ""))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path, note


# --- summary -----------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.-])\d+(?:\.\d+)?(?![\w-])")


def _reason_counts(frame: pd.DataFrame) -> pd.Series:
    """Infeasible rows per reason, numbers masked as ``#`` so that one cause is one line."""
    if "reason" not in frame:
        return pd.Series(dtype=int)
    reasons = frame.loc[~frame["feasible"].astype(bool), "reason"].fillna("no reason recorded").astype(str)
    heads = reasons.map(lambda r: _NUMBER.sub("#", r.split(". ")[0].split(": ")[0]).strip())
    return heads.value_counts()


def _cell(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if column.endswith("_s") and not column.endswith("per_s"):
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
    if column.startswith("cost_"):
        return f"${value:,.3f}"
    if column.startswith("memory_bytes"):
        return f"{value / 1e9:.1f} GB"
    if isinstance(value, (float, np.floating)):
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"
    return str(value)


def summary_table(frame: pd.DataFrame, top: pd.DataFrame, objectives: Mapping[str, str]) -> str:
    """The top plans as a markdown table, best first, with the options that vary in the study."""
    counts = distinct(frame)
    options = [*plan_columns(frame), *(c for c in WORKLOAD if counts.get(c, 0) > 1)]
    numbers = [c for c in ("devices", "ttft_s", "tpot_s", "throughput_tokens_per_s", "throughput_per_device",
                           "tokens_per_s_per_user", "cost_usd_per_million_tokens", "memory_bytes_total")
               if c in top]
    columns = list(dict.fromkeys([*options, *objectives, *numbers]))
    header = "| # | " + " | ".join(HEADERS.get(c, c) for c in columns) + " |"
    align = ("---:" if pd.api.types.is_numeric_dtype(top[c]) else "---" for c in columns)
    rule = "|---:|" + "|".join(align) + "|"
    lines = [header, rule]
    for k, (_, row) in enumerate(top.iterrows(), start=1):
        lines.append(f"| {k} | " + " | ".join(_cell(c, row[c]) for c in columns) + " |")
    return "\n".join(lines)


def _summary(frame: pd.DataFrame, source: str, objectives: Mapping[str, str], top: pd.DataFrame,
             front: pd.DataFrame, shown: int, paths: Mapping[str, Path], heat: tuple[str, str, str] | None,
             heat_note: str) -> str:
    n, ok = len(frame), int(frame["feasible"].sum())
    counts = distinct(frame)
    varying = [c for c in option_columns(frame) if counts[c] > 1]
    (first, first_dir), (second, second_dir) = objectives.items()
    lines = [f"# Study report: {Path(source).name if source != 'the study' else source}", "",
             f"- configurations: {n:,}, feasible: {ok:,} ({ok / n:.0%}), plans: {frame['plan'].nunique():,}",
             f"- options varied: {', '.join(f'{c} ({counts[c]})' for c in varying) or 'none'}",
             f"- Pareto front of {first} ({first_dir}) and {second} ({second_dir}): {len(front):,} "
             f"configuration{'' if len(front) == 1 else 's'} "
             f"([{FILES['front']}]({FILES['front']}))", ""]
    reasons = _reason_counts(frame)
    lines += ["## Infeasible configurations", ""]
    if len(reasons):
        lines += ["| reason (numbers as #) | configurations |", "|---|---:|"]
        lines += [f"| {reason.replace('|', '/')} | {count:,} |" for reason, count in reasons.items()]
    else:
        lines.append("Every configuration is feasible.")
    lines += ["", f"## Top {len(top)} plans by {first} ({first_dir})", "",
              "Each plan's best configuration, best first (ties: the second objective, then fewer devices).",
              "", summary_table(frame, top, objectives), ""]
    lines += ["## Plots", ""]
    captions = {
        "pareto": f"Pareto front: {LABELS.get(first, first)} against {LABELS.get(second, second)}, "
                  "every feasible configuration coloured by plan",
        "latency": f"latency of the prefill and decode steps by kind of op, top {shown} plans",
        "memory": f"weights, KV cache and activations per device, top {shown} plans",
        "roofline": f"each device's roofline with the prefill and decode steps of the top {shown} plans",
    }
    if heat is not None:
        captions["heatmap"] = (f"{heat[2]} over {heat[0]} and {heat[1]} (hatched: infeasible)"
                               + (f"; {heat_note}" if heat_note else ""))
    for key, caption in captions.items():
        if key in paths:
            lines += [f"- [{paths[key].name}]({paths[key].name}): {caption}", "",
                      f"  ![{caption}]({paths[key].name})", ""]
    if heat is None:
        lines += ["- no heat map: fewer than two options vary (name the axes with --heatmap X,Y,COLUMN)", ""]
    lines += ["Numbers are InferSim's model (`estimate`'s roofline for one static batch), "
              "not measurements.", ""]
    return "\n".join(lines)


# --- the report --------------------------------------------------------------------------------

def write_report(study: pd.DataFrame | str | Path, out_dir: str | Path,
                 objectives: Mapping[str, str] | str | None = None,
                 heatmap: str | Sequence[str] | None = None, top: int = 5) -> dict[str, Path]:
    """Write the study's plots, ``pareto_front.csv`` and ``summary.md`` into ``out_dir``.

    ``study``: the table (a DataFrame, or the .parquet/.csv ``infersim sweep`` wrote);
    ``objectives``: two, column -> ``"min"``/``"max"`` or ``"COL:DIR,COL:DIR"`` (default
    throughput per device and per-user tokens/s, both max; the first ranks the top plans);
    ``heatmap``: ``"X,Y,COLUMN"`` (default batch x input_len of throughput_tokens_per_s);
    ``top``: plans in the summary (the plots show at most ``MAX_PLOTTED``).
    Returns the written paths by kind (``pareto``, ``latency``, ``memory``, ``roofline``,
    ``heatmap``, ``front``, ``summary``)."""
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise InferSimError(f"--top must be a whole number of at least 1, got {top!r}")
    frame, source = load_study(study)
    frame = prepare(frame)
    if "cost_usd_per_million_tokens" not in frame:  # a table written with prices=False
        from simulator.study.cost import add_cost

        frame = add_cost(frame)
    chosen = resolve_objectives(objectives, frame)
    heat = resolve_heatmap(heatmap, frame)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InferSimError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    from simulator.report.pareto_plot import plot_pareto
    from simulator.study.pareto import pareto_front

    feasible = frame[frame["feasible"]]
    front = pareto_front(frame, chosen)
    colours = plan_colours(frame["plan"])
    title = f"Pareto front: {len(front)} of {len(feasible):,} feasible configurations"
    paths["pareto"] = plot_pareto(feasible, front, chosen, out / FILES["pareto"], colour_by="plan",
                                  colours=colours, title=title)
    front.drop(columns=["plan"]).to_csv(out / FILES["front"], index=False)
    paths["front"] = out / FILES["front"]

    ranked = top_plans(frame, chosen, int(top))
    shown = ranked.head(MAX_PLOTTED)
    results = rerun(shown, option_columns(frame))
    paths["latency"] = plot_latency(shown, results, out / FILES["latency"])
    paths["memory"] = plot_memory(shown, results, out / FILES["memory"])
    paths["roofline"] = plot_roofline(shown, results, colours, out / FILES["roofline"])
    note = ""
    if heat is not None:
        paths["heatmap"], note = plot_heatmap(frame, *heat, out / FILES["heatmap"])
    summary = out / FILES["summary"]
    summary.write_text(_summary(frame, source, chosen, ranked, front, len(shown), paths, heat, note))
    paths["summary"] = summary
    return paths
