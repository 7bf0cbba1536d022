"""Plots of a serving run: latency CDFs, and batch size, KV use and power over time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simulator.engine.records import ServeRecords  # noqa: E402


def _cdf(ax, values: np.ndarray, label: str) -> None:
    values = np.sort(np.asarray(values, dtype=float))
    if values.size:
        ax.plot(values * 1e3, np.arange(1, values.size + 1) / values.size, label=label)


def plot_serving(records: ServeRecords, folder: str | Path, title: str = "") -> list[Path]:
    """Write ``latency_cdf.png`` and ``timeline.png`` into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = records.completed
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    _cdf(axes[0], (done["first_token_s"] - done["arrival_s"]).to_numpy(), "TTFT")
    _cdf(axes[1], records.token_gaps_s, "TBT")
    _cdf(axes[2], (done["completion_s"] - done["arrival_s"]).to_numpy(), "end to end")
    for ax, name in zip(axes, ("TTFT", "time between tokens", "end to end"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "time between tokens" else "fraction of tokens")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title or "latency CDFs")
    fig.tight_layout()
    cdf = folder / "latency_cdf.png"
    fig.savefig(cdf, dpi=120)
    plt.close(fig)

    it = records.iterations
    fig, axes = plt.subplots(3, 1, figsize=(12, 8), sharex=True)
    for replica, rows in it.groupby("replica"):
        label = f"replica {replica} ({rows['pool'].iloc[0]})"
        t = rows["start_s"].to_numpy()
        axes[0].step(t, (rows["prefill_requests"] + rows["decode_requests"]).to_numpy(), where="post",
                     label=label, lw=0.8)
        axes[1].step(t, (rows["kv_blocks_used"] / rows["kv_blocks_total"].clip(lower=1)).to_numpy(),
                     where="post", lw=0.8)
        axes[2].step(t, rows["power_w"].to_numpy(), where="post", lw=0.8)
    axes[0].set_ylabel("requests in the batch")
    axes[1].set_ylabel("KV blocks in use")
    axes[2].set_ylabel("power (W)")
    axes[2].set_xlabel("time (s)")
    if it["replica"].nunique() <= 8:
        axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title or "batch, KV cache and power over time")
    fig.tight_layout()
    timeline = folder / "timeline.png"
    fig.savefig(timeline, dpi=120)
    plt.close(fig)
    return [cdf, timeline]
