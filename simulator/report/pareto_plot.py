"""A sweep's Pareto front over its feasible points (two objectives), as a PNG."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

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
          "energy_j_per_token": "energy (J per token)", "memory_bytes_total": "memory (bytes)"}


def _label(column: str, direction: str) -> str:
    return f"{LABELS.get(column, column)}, {'lower' if direction == 'min' else 'higher'} is better"


def _log(values: np.ndarray) -> bool:
    """Log axis when the values are positive and span more than a factor of 20."""
    values = values[np.isfinite(values)]
    return bool(len(values)) and values.min() > 0 and values.max() / values.min() > 20


def plot_pareto(feasible: pd.DataFrame, front: pd.DataFrame, objectives: Mapping[str, str],
                path: str | Path, colour_by: str | None = "hardware", title: str | None = None) -> Path:
    """All feasible points in grey (or coloured by ``colour_by``), the front as a line of marked
    points over them; the first objective on x, the second on y. Log axes where a range spans
    more than a factor of 20."""
    if len(objectives) != 2:
        raise InferSimError(f"--plot draws two objectives; --pareto names {len(objectives)}")
    (x, x_dir), (y, y_dir) = objectives.items()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    groups = (feasible.groupby(colour_by, sort=True) if colour_by in feasible and
              feasible[colour_by].nunique() > 1 else [("feasible configurations", feasible)])
    for name, rows in groups:
        ax.scatter(rows[x], rows[y], s=6, alpha=0.35, label=str(name), linewidths=0)
    ordered = front.sort_values(x)
    ax.plot(ordered[x], ordered[y], "-o", color="black", markersize=4, linewidth=1.2,
            label=f"Pareto front ({len(front)} plans)")
    if _log(feasible[x].to_numpy(dtype=float)):
        ax.set_xscale("log")
    if _log(feasible[y].to_numpy(dtype=float)):
        ax.set_yscale("log")
    ax.set_xlabel(_label(x, x_dir))
    ax.set_ylabel(_label(y, y_dir))
    ax.set_title(title or f"Pareto front of {len(feasible):,} feasible configurations")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
