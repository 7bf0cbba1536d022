"""Time a sweep of a million configurations, a loop of single estimates and the peers on PyPI.

    python -m docs.bench_sweep                      # 1,000,000 configurations (batch 1..1000)
    python -m docs.bench_sweep --batch-step 20      # every 20th batch: 50,000, same spread

The grid: llama-2-7b on a100-80gb-sxm, batch 1..1000 x 10 prompt lengths x 100 output lengths
(8..800), every other option at its default. The sweep (``simulator.sweep``, groups costed as
arrays) runs once over all of it; a loop of ``simulator.estimate`` calls, llm-analysis's
``infer`` and GenZ's ``prefill_moddeling`` + ``decode_moddeling`` (``pip install llm-analysis
genz-llm``; skipped when not importable) each run on a random sample of its feasible
configurations (the peers raise on one that does not fit), and each is reported in
configurations per second and as the sweep's ratio to it. Also one
estimate's median time (the 1 ms target). Prints the CPU and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np

import simulator
from docs.bench_estimate import cpu_model
from simulator.study.options import configurations
from simulator.study.sweep import evaluate

INPUT_LENS = [64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072]
AXES = {"model": "llama-2-7b", "hardware": "a100-80gb-sxm", "input_len": INPUT_LENS,
        "output_len": {"range": [8, 800], "step": 8}}



def per_config_s(call, sample: list[tuple[int, int, int]]) -> tuple[float, int]:
    """Seconds per configuration over the sample, and how many raised."""
    failed = 0
    start = time.perf_counter()
    for batch, input_len, output_len in sample:
        try:
            call(batch, input_len, output_len)
        except Exception:  # a peer's own errors (e.g. out of memory) still cost their time
            failed += 1
    return (time.perf_counter() - start) / len(sample), failed


def peers() -> dict:
    """The peers that import here, each as a function of (batch, input_len, output_len)."""
    found = {}
    try:
        from llm_analysis.analysis import infer

        found["llm-analysis (infer)"] = lambda b, i, o: infer(
            model_name="NousResearch_Llama-2-7b-hf", gpu_name="a100-sxm-80gb", dtype_name="w16a16e16",
            log_level="ERROR", batch_size_per_gpu=b, seq_len=i, num_tokens_to_generate=o)
    except ImportError:
        print("llm-analysis not importable: skipped (pip install llm-analysis)")
    try:
        from GenZ import decode_moddeling, prefill_moddeling

        def genz(b: int, i: int, o: int) -> None:
            prefill_moddeling(model="meta-llama/Llama-2-7B", batch_size=b, input_tokens=i,
                              system_name="A100_80GB_GPU", bits="bf16")
            decode_moddeling(model="meta-llama/Llama-2-7B", batch_size=b, input_tokens=i, output_tokens=o,
                             system_name="A100_80GB_GPU", bits="bf16")

        found["GenZ (prefill + decode)"] = genz
    except ImportError:
        print("GenZ not importable: skipped (pip install genz-llm)")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-step", type=int, default=1, help="every n-th batch of 1..1000 (default 1)")
    parser.add_argument("--sample", type=int, default=2000, help="configurations in the estimate loop")
    parser.add_argument("--peer-sample", type=int, default=100,
                        help="configurations per peer (GenZ gets a tenth: it takes ~0.3 s each)")
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; numpy {np.__version__}; "
          f"load average before {os.getloadavg()}")

    axes = {**AXES, "batch": {"range": [1, 1000], "step": args.batch_step}}
    start = time.perf_counter()
    configs = configurations(axes)
    built = time.perf_counter()
    frame = evaluate(configs)
    done = time.perf_counter()
    n = len(frame)
    sweep_rate = n / (done - start)
    print(f"sweep: {n:,} configurations in {done - start:.2f} s ({built - start:.2f} s building them), "
          f"{frame.attrs['as_arrays']:,} as arrays, {int(frame.feasible.sum()):,} feasible: "
          f"{sweep_rate:,.0f} configurations/s")

    # The loop and the peers run feasible configurations (an infeasible one makes a peer raise
    # early); the sweep above costs every configuration in full, infeasible ones too.
    rng = np.random.default_rng(0)
    feasible = np.flatnonzero(frame.feasible.to_numpy())
    rows = rng.choice(feasible, size=min(args.sample, len(feasible)), replace=False)
    sample = [(int(b), int(i), int(o)) for b, i, o in configs.loc[rows, ["batch", "input_len", "output_len"]]
              .itertuples(index=False)]
    model, system = simulator.load_model("llama-2-7b"), simulator.load_system("a100-80gb-sxm")
    simulator.estimate(model, system, batch=8)
    def single(b: int, i: int, o: int) -> None:
        simulator.estimate(model, system, batch=b, input_len=i, output_len=o)

    one = statistics.median(per_config_s(single, [(8, 512, 128)])[0] for _ in range(300))
    print(f"one estimate (batch 8, 512 in / 128 out, median of 300): {one * 1e3:.3f} ms")
    results = [("simulator.sweep (arrays)", 1 / sweep_rate, n, 0)]
    loop, failed = per_config_s(lambda b, i, o: simulator.estimate(model, system, batch=b, input_len=i,
                                                                  output_len=o, check_memory=False), sample)
    results.append(("loop of simulator.estimate", loop, len(sample), failed))
    if not args.no_peers:
        for name, call in peers().items():
            size = max(1, args.peer_sample // 10) if name.startswith("GenZ") else args.peer_sample
            seconds, failed = per_config_s(call, sample[:size])
            results.append((name, seconds, size, failed))
    print("\n| what | configurations timed | raised | per configuration | configurations/s "
          "| sweep's speedup |")
    print("|---|---|---|---|---|---|")
    for name, seconds, count, failed in results:
        print(f"| {name} | {count:,} | {failed} | {seconds * 1e6:,.1f} us | {1 / seconds:,.0f} | "
              f"{seconds * sweep_rate:,.1f}x |")
    print(f"\nload average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
