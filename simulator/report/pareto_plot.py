"""A sweep's Pareto front over its feasible points (two objectives), as a PNG."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from simulator.errors import InferSimError  # noqa: E402

LABELS = {"tpot_s": "TPOT (s per token)", "ttft_s": "TTFT (s)", "e2e_s": "end-to-end latency (s)",
          "throughput_tokens_per_s": "throughput (output tokens/s)",
          "throughput_per_device": "throughput per device (output tokens/s)",
          "cost_usd_per_million_tokens": "cost (USD per million output tokens)", "devices": "devices",
          "energy_j_per_token": "energy (J per token)", "memory_bytes_total": "memory (bytes)",
          "tokens_per_s_per_user": "per-user speed (tokens/s, 1 / TPOT)"}


def _label(column: str, direction: str) -> str:
    return f"{LABELS.get(column, column)}, {'lower' if direction == 'min' else 'higher'} is better"


def _log(values: np.ndarray) -> bool:
    """Log axis when the values are positive and span more than a factor of 20."""
    values = values[np.isfinite(values)]
    return bool(len(values)) and values.min() > 0 and values.max() / values.min() > 20


def plot_pareto(feasible: pd.DataFrame, front: pd.DataFrame, objectives: Mapping[str, str],
                path: str | Path, colour_by: str | None = "hardware", title: str | None = None,
                colours: Mapping[str, Any] | None = None) -> Path:
    """All feasible points in grey (or coloured by ``colour_by``, from ``colours`` where it names
    the value), the front as a line of marked points over them; the first objective on x, the
    second on y. Log axes where a range spans more than a factor of 20."""
    if len(objectives) != 2:
        raise InferSimError(f"--plot draws two objectives; --pareto names {len(objectives)}")
    (x, x_dir), (y, y_dir) = objectives.items()
    groups = (list(feasible.groupby(colour_by, sort=True)) if colour_by in feasible and
              feasible[colour_by].nunique() > 1 else [("feasible configurations", feasible)])
    # Many or long group names: the legend goes beside the axes, not over the points.
    beside = len(groups) > 8 or max(len(str(name)) for name, _ in groups) > 28
    fig, ax = plt.subplots(figsize=(12.5 if beside else 7.5, 5))
    palette = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    small = len(feasible) <= 2000  # a small study's points stay visible
    colour_of = {}
    for k, (name, rows) in enumerate(groups):
        colour_of[str(name)] = (colours or {}).get(str(name), palette(k % palette.N))
        ax.scatter(rows[x], rows[y], s=16 if small else 6, alpha=0.5 if small else 0.35, label=str(name),
                   linewidths=0, color=colour_of[str(name)])
    ordered = front.sort_values(x)
    ax.plot(ordered[x], ordered[y], "-", color="black", linewidth=1.2, zorder=2)
    # The front's points in their group's colour, edged in black: which plans make the front.
    fill = ([colour_of.get(str(v), "black") for v in ordered[colour_by]] if len(groups) > 1
            else ["black"] * len(ordered))
    ax.scatter(ordered[x], ordered[y], s=30, c=fill, edgecolors="black", linewidths=0.8, zorder=3)
    ax.plot([], [], "-o", color="black", markerfacecolor="white", markersize=4,
            label=f"Pareto front ({len(front)} plans)")
    if _log(feasible[x].to_numpy(dtype=float)):
        ax.set_xscale("log")
    if _log(feasible[y].to_numpy(dtype=float)):
        ax.set_yscale("log")
    ax.set_xlabel(_label(x, x_dir))
    ax.set_ylabel(_label(y, y_dir))
    ax.set_title(title or f"Pareto front of {len(feasible):,} feasible configurations")
    ax.grid(True, which="major", alpha=0.3)
    if beside:
        ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
