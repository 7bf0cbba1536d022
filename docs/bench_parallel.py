"""Time single estimates under parallel plans and disaggregation (medians of 300 calls).

    python -m docs.bench_parallel      (from the repository root)
"""

from __future__ import annotations

import os

import simulator
from docs.bench_estimate import cpu_model, median_s

CASES = [
    ("llama-2-70b, no plan (one device's memory not checked)", "llama-2-70b", "dgx-h100",
     {"check_memory": False}),
    ("llama-2-70b, TP 8", "llama-2-70b", "dgx-h100", {"parallel": simulator.ParallelPlan(tp=8)}),
    ("llama-2-70b, TP 4 x PP 2, 4 micro-batches", "llama-2-70b", "dgx-h100",
     {"parallel": simulator.ParallelPlan(tp=4, pp=2, micro_batches=4)}),
    ("mixtral-8x7b, TP 2 x EP 8", "mixtral-8x7b", "dgx-h100",
     {"parallel": simulator.ParallelPlan(tp=2, ep=8)}),
    ("llama-2-70b, TP 8, prefill on H100 / decode on A100", "llama-2-70b", "dgx-h100",
     {"parallel": simulator.ParallelPlan(tp=8), "prefill_hardware": "dgx-h100",
      "decode_hardware": "dgx-a100"}),
]


def main() -> None:
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()}")
    print("| what | median |")
    print("|---|---|")
    for label, model_name, hardware, options in CASES:
        model, system = simulator.load_model(model_name), simulator.load_system(hardware)
        seconds = median_s(lambda: simulator.estimate(model, system, batch=8, **options))
        print(f"| {label}, batch 8 | {seconds * 1e3:.2f} ms |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
