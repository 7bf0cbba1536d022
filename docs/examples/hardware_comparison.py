"""One model and one workload on every kind of GPU InferSim ships: which is fastest, which cheapest?

Llama-3.1-8B in bf16, 16 requests of 1,024 prompt tokens and 256 generated tokens, on the devices
of ``infersim list hardware``. ``simulator.sweep`` estimates each device (those the model does
not fit on keep their row, with the reason) and prices it from ``hardware_specs/prices.yaml``;
a bar chart then compares TTFT, TPOT, throughput and cost per million output tokens.

    python docs/examples/hardware_comparison.py [--out DIR]

writes ``hardware_comparison.png`` and ``hardware_comparison.csv`` into DIR (default: a new
temporary folder). The same numbers from the command line, one device at a time:

    infersim estimate --model llama-3.1-8b --hardware h100-sxm --batch 16 --input-len 1024 --output-len 256
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import simulator  # noqa: E402

MODEL = "llama-3.1-8b"
WORKLOAD = {"batch": 16, "input_len": 1024, "output_len": 256}
# Single devices from `infersim list hardware`, oldest and smallest first.
DEVICES = ["t4", "l4", "a10", "a40", "l40s", "a100-80gb-sxm", "h100-sxm", "h200-sxm", "mi300x", "b200"]
# (column, axis label, scale to the unit shown)
PANELS = [("ttft_s", "TTFT (ms)", 1e3), ("tpot_s", "TPOT (ms per token)", 1e3),
          ("throughput_tokens_per_s", "throughput (output tokens/s)", 1.0),
          ("cost_usd_per_million_tokens", "cost (USD per million output tokens)", 1.0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the chart and the table (default: a temp dir)")
    out = parser.parse_args(argv).out or Path(tempfile.mkdtemp(prefix="infersim-hardware-"))
    out.mkdir(parents=True, exist_ok=True)

    # 1. One configuration per device: an axis with one value is a constant.
    table = simulator.sweep({"model": MODEL, "hardware": DEVICES, **WORKLOAD})
    columns = ["hardware", "feasible", *(c for c, _, _ in PANELS), "memory_bytes_total", "cost_note"]
    table[columns].to_csv(out / "hardware_comparison.csv", index=False)
    print(table[columns[:-1]].to_string(index=False))

    # 2. Four bar charts over the same devices. A device the model does not fit on gets a hatched
    #    grey stub instead of a bar, one without a price a note instead of a cost.
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
    x = np.arange(len(table))
    fits = table["feasible"].to_numpy(dtype=bool)
    for ax, (column, label, scale) in zip(axes.flat, PANELS, strict=True):
        values = table[column].to_numpy(dtype=float) * scale
        shown = fits & np.isfinite(values)
        ax.bar(x[shown], values[shown], color="#4c72b0", width=0.7)
        top = np.nanmax(values[shown]) if shown.any() else 1.0
        for k in np.flatnonzero(~shown):
            why = "does not fit" if not fits[k] else "no price"
            ax.bar(x[k], top * 0.04, color="0.85", edgecolor="0.5", hatch="///", width=0.7)
            ax.text(x[k], top * 0.06, why, rotation=90, ha="center", va="bottom", fontsize=7)
        for k in np.flatnonzero(shown):
            text = f"{values[k]:,.0f}" if values[k] >= 100 else f"{values[k]:.3g}"
            ax.text(x[k], values[k], text, ha="center", va="bottom", fontsize=7)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_xticks(x, table["hardware"], rotation=45, ha="right")
    fig.suptitle(f"{MODEL}, batch {WORKLOAD['batch']}, {WORKLOAD['input_len']} tokens in / "
                 f"{WORKLOAD['output_len']} out, bf16, one device each (modelled)")
    fig.tight_layout()
    chart = out / "hardware_comparison.png"
    fig.savefig(chart, dpi=120)
    plt.close(fig)
    print(f"wrote {chart} and {out / 'hardware_comparison.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
