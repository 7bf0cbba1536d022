"""The device's roofline with each op of an estimate placed on it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simulator.result import EstimateResult  # noqa: E402
from simulator.specs.hardware import Device  # noqa: E402

MARKERS = {"prefill": "o", "decode": "^"}


def draw_roofs(ax, device: Device, compute_dtype: str) -> None:
    """The device's roofs in TFLOP/s over FLOP/byte: peak of ``compute_dtype`` (and fp32) against
    main-memory bandwidth, and the achievable roof at the efficiencies of a large op."""
    bandwidth = device.main_memory.bandwidth
    intensities = np.logspace(-2, 5, 300)
    for dtype in dict.fromkeys((compute_dtype, "fp32")):
        peak = device.compute.get(dtype)  # type: ignore[call-overload]
        if peak is None:
            continue
        ax.plot(intensities, np.minimum(peak, bandwidth * intensities) / 1e12,
                label=f"{dtype} roof ({peak / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s)")
    eff = device.efficiency
    eff_peak = device.compute[compute_dtype] * float(eff.compute.at(1e12))  # type: ignore[index]
    eff_bw = bandwidth * float(eff.memory.at(1e9))
    ax.plot(intensities, np.minimum(eff_peak, eff_bw * intensities) / 1e12, ":", color="grey",
            label="achievable roof (efficiency at 1 TFLOP, 1 GB)")


def plot_roofline(result: EstimateResult, device: Device, out: str | Path) -> Path:
    """Achieved FLOP/s (FLOPs over modelled time) against arithmetic intensity, per op and phase."""
    frame = result.ops_frame()
    frame = frame[frame["flops"] > 0]
    fig, ax = plt.subplots(figsize=(9, 6))
    draw_roofs(ax, device, result.precision.compute)
    cmap = plt.get_cmap("tab20")
    kinds = sorted(frame["op"].unique())
    for phase, marker in MARKERS.items():
        part = frame[frame["phase"] == phase]
        for _, row in part.iterrows():
            achieved = row["flops"] / row["time_s"] / 1e12
            ax.scatter(row["intensity"], achieved, marker=marker, s=50,
                       color=cmap(kinds.index(row["op"]) % 20), edgecolors="black", linewidths=0.4)
    for op in kinds:
        ax.scatter([], [], color=cmap(kinds.index(op) % 20), label=op)
    for phase, marker in MARKERS.items():
        ax.scatter([], [], marker=marker, color="white", edgecolors="black", label=phase)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of device memory)")
    ax.set_ylabel("achieved TFLOP/s (modelled)")
    ax.set_title(f"{result.model} on {device.name}: batch {result.batch}, "
                 f"{result.input_len} in / {result.output_len} out")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
