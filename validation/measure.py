"""Run the reference executor over a grid of cases and record medians and noise.

    python -m validation.measure --suite quick|full|shapes|strategies|strategies2|parallel \
        --out validation/measurements/FILE.csv

Each row is one case (model, batch, prompt and output length). Cases are run
round-robin, ``--rounds`` times, so that each case's runs are spread over the
whole measurement rather than caught together in one slow phase of a shared
machine. A row has the fastest round's median (``*_best_s``, what validation
compares with, as calibration keeps each microbenchmark's fastest pass) and
the median, min, max and coefficient of variation over all runs of TTFT and
TPOT, the time outside the math, the machine and the highest load average
seen. A round disturbed by another process (load average above the cores'
worth of this process) is run again once; the row records how often.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress

# (model, largest batch x prompt tokens of a prefill) of each suite's models.
FULL_MODELS = [("tiny-dense-58m", 8192), ("tiny-moe-140m", 8192), ("small-dense-250m", 2048)]
SHAPES_MODELS = ("opt-125m", "deep-mqa-70m", "qwen-moe-tiny")
SUITES = ("quick", "full", "shapes", "strategies", "strategies2", "parallel")
BATCHES = [1, 2, 4, 8, 16, 32]
PROMPTS = [128, 256, 512, 1024, 2048, 4096]


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    input_len: int
    output_len: int
    offload_layers: int = 0  # the last layers' weights on disk, read back every step
    prefetch: bool = True
    kv_window: int = 0  # KV eviction: decode attends to the last kv_window tokens (0: all)
    tp: int = 1  # worker processes: tensor-, expert- and pipeline-parallel degrees
    ep: int = 1
    pp: int = 1
    micro_batches: int = 1
    draft: str = ""  # speculative decoding's draft model ("": none), drafting gamma tokens a round
    gamma: int = 0
    alpha: float = 0.0  # the seeded acceptance rate of a drafted token
    kv_policy: str = ""  # "streaming" or "h2o" keeping kv_budget tokens ("": the full cache)
    kv_budget: int = 0
    kv_sinks: int = 4  # streaming's attention sinks
    kv_bits: int = 0  # KIVI-quantized KV cache (8, 4, 2; 0: float32) with kv_residual float32 tokens
    kv_residual: int = 0
    expert_cache: float | None = None  # MoE: fraction of each layer's experts in memory, the rest on disk

    @property
    def key(self) -> str:
        key = f"{self.model}/b{self.batch}/p{self.input_len}/g{self.output_len}"
        if self.offload_layers:
            key += f"/disk{self.offload_layers}" + ("" if self.prefetch else "-noprefetch")
        if self.kv_window:
            key += f"/kvwin{self.kv_window}"
        if self.tp > 1:
            key += f"/tp{self.tp}"
        if self.ep > 1:
            key += f"/ep{self.ep}"
        if self.pp > 1:
            key += f"/pp{self.pp}-mb{self.micro_batches}"
        if self.draft:
            key += f"/spec-{self.draft}-g{self.gamma}-a{self.alpha:g}"
        if self.kv_policy:
            key += f"/kv-{self.kv_policy}{self.kv_budget}"
            key += f"-s{self.kv_sinks}" if self.kv_policy == "streaming" else ""
        if self.kv_bits:
            key += f"/kvint{self.kv_bits}-r{self.kv_residual}"
        if self.expert_cache is not None:
            key += f"/experts{self.expert_cache:g}"
        return key

    def options(self) -> dict[str, Any]:
        """The case's strategy as ``execute`` keyword arguments."""
        options: dict[str, Any] = {
            "offload_layers": self.offload_layers, "prefetch": self.prefetch,
            "kv_window": self.kv_window or None,
            "tp": self.tp, "ep": self.ep, "pp": self.pp, "micro_batches": self.micro_batches,
        }
        if self.draft:
            options.update(draft_model=self.draft, spec_gamma=self.gamma, spec_alpha=self.alpha)
        if self.kv_policy:
            options.update(kv_policy=self.kv_policy, kv_budget=self.kv_budget, kv_sinks=self.kv_sinks)
        if self.kv_bits:
            options.update(kv_bits=self.kv_bits, kv_residual=self.kv_residual)
        if self.expert_cache is not None:
            options["expert_cache"] = self.expert_cache
        return options


def suite(name: str) -> list[Case]:
    if name == "quick":
        return [Case(model, batch, prompt, 8)
                for model in ("tiny-dense-58m", "tiny-moe-140m")
                for batch in (1, 4, 16) for prompt in (128, 512)]
    if name == "full":
        return [Case(model, batch, prompt, 16)
                for model, cap in FULL_MODELS for batch in BATCHES for prompt in PROMPTS
                if batch * prompt <= cap]
    if name == "strategies":
        # Issue 4's strategies as the executor runs them: layers on disk (with and without a
        # reader thread) and a KV eviction window, on the 16-layer model.
        offload = [Case("small-dense-250m", batch, 128, 8, layers, prefetch)
                   for batch in (1, 8) for layers in (4, 8, 16) for prefetch in (True, False)]
        window = [Case("tiny-dense-58m", batch, 2048, 16, kv_window=w)
                  for batch in (1, 4) for w in (128, 512)]
        return offload + window
    if name == "shapes":
        # Held-out shapes: models neither calibration nor the full suite has seen (OPT-125M's
        # real shape, a deep narrow MQA decoder, a Qwen3-MoE-style model with q/k norm and 16
        # fine-grained experts).
        return [Case(model, batch, prompt, 16)
                for model in SHAPES_MODELS for batch in (1, 4, 16) for prompt in (128, 512)
                if batch * prompt <= 2048]
    if name == "strategies2":
        return strategies2_suite()
    if name == "parallel":
        return parallel_suite()
    raise SystemExit(f"unknown suite {name!r}; choose {', '.join(SUITES[:-1])} or {SUITES[-1]}")


def strategies2_suite() -> list[Case]:
    """Issue 4's KV and expert strategies as the executor runs them: 26 cases.

    StreamingLLM and H2O at budgets 128 and 512 (batch 1 and 4, 2048-token prompts), KIVI
    int8/int4/int2 with 0 and 128 residual tokens (batch 4, 1024 and 2048), and an expert cache
    of 0.25 and 0.5 on the MoE model beside its baseline (batch 1 and 8, 128-token prompts). The
    dense baselines are the full suite's cases of the same shape.
    """
    eviction = [Case("tiny-dense-58m", batch, 2048, 16, kv_policy=policy, kv_budget=budget)
                for policy in ("streaming", "h2o") for batch in (1, 4) for budget in (128, 512)]
    quantized = [Case("tiny-dense-58m", 4, prompt, 16, kv_bits=bits, kv_residual=residual)
                 for prompt in (1024, 2048) for bits in (8, 4, 2) for residual in (0, 128)]
    experts = [Case("tiny-moe-140m", batch, 128, 8, expert_cache=fraction)
               for batch in (1, 8) for fraction in (None, 0.25, 0.5)]
    return eviction + quantized + experts


def parallel_suite() -> list[Case]:
    """Issue 5's plans as the executor runs them, each beside its one-process baseline: 34 cases.

    TP 1/2 on both dense models and EP 1/2 on the MoE model (prefills capped at the full
    suite's tokens per model), PP 2 with 1 and 2 micro-batches, and speculative decoding of
    small-dense-250m drafted by tiny-dense-58m (same vocabulary) at gamma 1, 4, 8 and alpha 0.5, 0.9.
    """
    cap = dict(FULL_MODELS)
    tensor = [Case(model, batch, prompt, 8, tp=tp)
              for model in ("tiny-dense-58m", "small-dense-250m") for batch in (1, 8) for prompt in (128, 512)
              if batch * prompt <= cap[model] for tp in (1, 2)]
    expert = [Case("tiny-moe-140m", batch, prompt, 8, ep=ep)
              for batch in (2, 8) for prompt in (128, 512) for ep in (1, 2)]
    pipeline = [Case("small-dense-250m", 2, 128, 8)] + [  # batch 8's baseline is a TP case
        Case("small-dense-250m", batch, 128, 8, pp=2, micro_batches=micro)
        for batch in (2, 8) for micro in (1, 2)]
    speculative = [Case("small-dense-250m", 1, 128, 32)] + [
        Case("small-dense-250m", 1, 128, 32, draft="tiny-dense-58m", gamma=gamma, alpha=alpha)
        for gamma in (1, 4, 8) for alpha in (0.5, 0.9)]
    return tensor + expert + pipeline + speculative


def _cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.mean(values) if len(values) > 1 else 0.0


@dataclass
class _Samples:
    """What the rounds of one case measured so far."""

    ttft: list[list[float]] = field(default_factory=list)  # per round, its repeats
    tpot: list[list[float]] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)  # per round, from the executor
    loads: list[tuple[float, float]] = field(default_factory=list)
    probes: list[float] = field(default_factory=list)  # per round, the host's GEMM rate before it
    reruns: int = 0

    def row(self, case: Case) -> dict[str, Any]:
        ttft = [t for r in self.ttft for t in r]
        tpot = [t for r in self.tpot for t in r]
        best = min(range(len(self.ttft)), key=lambda i: statistics.median(self.ttft[i]))
        detail = self.details[best]
        parallel, speculative = detail.get("parallel") or {}, detail.get("speculative") or {}
        counters = (detail.get("strategy") or {}).get("counters", {})
        return {
            "case": case.key, "model": case.model, "batch": case.batch, "input_len": case.input_len,
            "output_len": case.output_len, "offload_layers": case.offload_layers,
            "prefetch": case.prefetch, "kv_window": case.kv_window,
            "tp": case.tp, "ep": case.ep, "pp": case.pp, "micro_batches": case.micro_batches,
            "draft": case.draft, "gamma": case.gamma, "alpha": case.alpha,
            "kv_policy": case.kv_policy, "kv_budget": case.kv_budget, "kv_sinks": case.kv_sinks,
            "kv_bits": case.kv_bits, "kv_residual": case.kv_residual, "expert_cache": case.expert_cache,
            "rounds": len(self.ttft), "repeats": len(ttft),
            "ttft_best_s": min(statistics.median(r) for r in self.ttft),
            "ttft_median_s": statistics.median(ttft), "ttft_min_s": min(ttft), "ttft_max_s": max(ttft),
            "ttft_cv": _cv(ttft),
            "tpot_best_s": min(statistics.median(r) for r in self.tpot),
            "tpot_median_s": statistics.median(tpot), "tpot_min_s": min(tpot), "tpot_max_s": max(tpot),
            "tpot_cv": _cv(tpot),
            "e2e_median_s": detail["e2e_s"],
            "dispatch_prefill_s": detail["dispatch_s_per_step"]["prefill"],
            "dispatch_decode_s": detail["dispatch_s_per_step"]["decode"],
            "kernels_decode": detail["kernels_per_step"]["decode"],
            "peak_memory_bytes": detail["peak_memory_bytes"],
            # Rank 0's seconds per step in collectives; a speculative round's mean tokens.
            "comm_prefill_s": parallel.get("prefill", {}).get("comm_s_per_step"),
            "comm_decode_s": parallel.get("decode", {}).get("comm_s_per_step"),
            "tokens_per_round": speculative.get("tokens_per_round"),
            "kv_cache_bytes": detail.get("memory", {}).get("kv_cache_bytes"),
            # Expert cache: hits, misses and bytes read from disk per step.
            **{f"{name}_{phase}": counters.get(phase, {}).get(name)
               for phase in ("prefill", "decode")
               for name in ("expert_hits", "expert_misses", "expert_bytes_read")},
            "load_before": round(max(load[0] for load in self.loads), 2),
            "load_after": round(max(load[1] for load in self.loads), 2),
            "reruns": self.reruns,
            # The machine's speed in the kept round (validate compares it with the calibration's).
            "host_gflops": round(self.probes[best] / 1e9, 2) if self.probes else None,
        }


def run(cases: list[Case], out: Path, repeats: int, rounds: int = 3) -> list[dict[str, Any]]:
    """Measure every case ``rounds`` times, round-robin, ``repeats`` timed runs a round.

    The machine's speed drifts for seconds at a time; back-to-back repeats all land in the
    same phase, so their spread says nothing about it. Rounds spread each case's runs over
    the whole measurement, and ``*_best_s`` (the fastest round's median, as calibration keeps
    a microbenchmark's fastest pass) is the undisturbed machine's time.
    """
    from simulator.calibrate.host import bench_peak
    from simulator.specs.loader import load_model
    from validation.executor.harness import execute
    from validation.executor.machine import machine_info
    from validation.executor.weights import init_weights

    info = machine_info("numpy", "cpu")
    cores = os.cpu_count() or 1
    samples = {case: _Samples() for case in cases}
    specs = {name: load_model(name) for name in dict.fromkeys(case.model for case in cases)}
    weights: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with Progress() as progress:
        task = progress.add_task("measuring", total=len(cases) * rounds)
        for index in range(rounds):
            # The VM's speed drifts by tens of percent over hours, invisible to the load average:
            # a GEMM-rate probe per round shows how far the machine sits from its calibration.
            probe = bench_peak(True)["gemm_flops"]
            for case in cases:
                progress.update(task, description=f"round {index + 1}/{rounds} {case.key}")
                if case.model not in weights:
                    weights[case.model] = init_weights(specs[case.model])
                record = samples[case]
                for attempt in range(2):
                    load_before = os.getloadavg()[0]
                    result = execute(specs[case.model], batch=case.batch, input_len=case.input_len,
                                     output_len=case.output_len, repeats=repeats,
                                     weights=weights[case.model], **case.options())
                    load_after = os.getloadavg()[0]
                    # This process keeps at most `cores` busy; more than one core's worth beyond
                    # that means someone else was running: run the round again, once.
                    if load_after <= cores + 1.0 or attempt == 1:
                        break
                    record.reruns += 1
                record.ttft.append([r.ttft_s for r in result.repeats])
                record.tpot.append([r.tpot_s for r in result.repeats if r.tpot_s is not None])
                record.details.append({**result.to_dict(), "e2e_s": result.e2e_s})
                record.loads.append((load_before, load_after))
                record.probes.append(probe)
                progress.advance(task)
            rows = [{**samples[case].row(case), "cpu": info.get("cpu_model", ""),
                     "cores": info.get("usable_cores", cores)} for case in cases]
            with open(out, "w", newline="") as handle:  # after every round: a long run survives a stop
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.measure",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=SUITES,
                        default="quick")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=3,
                        help="passes over all cases, spreading each case's runs in time (default 3)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case and round (default 1)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")
    cases = suite(args.suite)
    rows = run(cases, args.out, args.repeats, args.rounds)
    print(f"wrote {len(rows)} cases to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
