"""Time single estimates: median over repeats, specs preloaded and by name.

    python docs/bench_estimate.py
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import simulator

CASES = [
    ("llama-2-7b", "a100-80gb-sxm", {}),
    ("llama-3.1-70b", "h100-sxm", {"weight_dtype": "fp8"}),
    ("mixtral-8x7b", "h100-sxm", {"weight_dtype": "int4"}),
    ("deepseek-v2-lite", "l40s", {}),
]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_s(fn, repeats: int = 300) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()}")
    print("| model | hardware | options | preloaded specs (ms) | by name (ms) |")
    print("|---|---|---|---|---|")
    for model_name, hardware, options in CASES:
        model = simulator.load_model(model_name)
        system = simulator.load_system(hardware)
        pre = median_s(lambda: simulator.estimate(model, system, batch=8, **options))
        named = median_s(lambda: simulator.estimate(model_name, hardware, batch=8, **options))
        print(f"| {model_name} | {hardware} | {options or '-'} | {pre * 1e3:.3f} | {named * 1e3:.3f} |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
