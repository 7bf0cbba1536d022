"""Print the simulator's side of the serving rows of docs/reproductions.md (issue 8).

    python docs/reproduce_serving.py

Four serving-level results, set up with the serving engine (``simulator.engine``): Splitwise's
phase split at iso-power and iso-cost, POLCA's extra servers under a power budget, Sarathi-Serve's
chunked prefill against vLLM's prefill priority, and a MoE-Lens-style throughput bound. Nothing
here is fitted to the papers. Runs are a few hundred requests each so that the script takes under
two minutes on a 2-core machine; the traces are read from ``../shared/traces`` beside the repo.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from simulator.engine.power import servers_under_budget
from simulator.engine.records import ServeRecords
from simulator.engine.scheduler import SchedulerConfig
from simulator.engine.serve import serve
from simulator.engine.stepcost import ReplicaCost, power_capped
from simulator.engine.workload import Workload, arrivals, clip_lengths, draw_lengths, read_trace
from simulator.estimate import resolve_precision
from simulator.graph.transformer import kv_bytes_per_token, weight_bytes
from simulator.specs.hardware import System
from simulator.specs.loader import load_model, load_system
from simulator.strategies.parallel import ParallelPlan
from simulator.strategies.plan import search

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
AZURE = TRACES / "azure-llm-inference-2023"
ARXIV = TRACES / "arxiv-summarization-lengths.csv"

FP16 = {"weight_dtype": "fp16", "act_dtype": "fp16"}
TP8 = ParallelPlan(tp=8)
LLAMA_CONTEXT = 4096  # Llama-2-70B's max_position_embeddings: the traces are clipped to it


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")


def header(*names: str) -> None:
    row(*names)
    row(*("---" for _ in names))


def highest_rate(meets: Callable[[float], bool], start: float, factor: float = 1.6, bisections: int = 2,
                 max_probes: int = 12) -> float:
    """The highest arrival rate found to meet the SLOs: step from ``start`` by ``factor`` until
    the outcome flips, then bisect (geometrically) ``bisections`` times. 0 if nothing meets them."""
    good, bad = None, None
    rate, probes = start, 0
    while (good is None or bad is None) and probes < max_probes:
        probes += 1
        if meets(rate):
            good = rate
            rate *= factor
        else:
            bad = rate
            rate /= factor
        if good is None and rate < start / 64:
            return 0.0
    if good is None:
        return 0.0
    if bad is None:
        return good
    for _ in range(bisections):
        mid = math.sqrt(good * bad)
        if meets(mid):
            good = mid
        else:
            bad = mid
    return good


@cache
def _requests(path: Path, count: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poisson arrival times at one request a second and lengths sampled from a trace's columns."""
    rng = np.random.default_rng(seed)
    times = arrivals(count, 1.0, rng)
    return (times, draw_lengths(f"trace:{path}", count, rng, "num_prefill_tokens"),
            draw_lengths(f"trace:{path}", count, rng, "num_decode_tokens"))


def poisson_workload(path: Path, rate: float, duration_s: float, max_total: int | None = None,
                     seed: int = 0) -> Workload:
    """The requests arriving within ``duration_s`` at ``rate`` (Poisson), lengths sampled from the
    trace at ``path``. Every rate sees the same requests in the same order, only closer together
    (common random numbers), so a capacity search compares like with like; ``seed`` draws others."""
    times, prompt, output = _requests(path, seed=seed)
    times = times / rate
    n = max(1, int(np.searchsorted(times, duration_s)))
    workload = Workload(times[:n], prompt[:n], output[:n], source=f"{path.name} at {rate:.3g}/s")
    return clip_lengths(workload, max_total=max_total) if max_total else workload


# --- Splitwise: phase splitting at iso-power and iso-cost ---------------------------------------

# SplitwiseSim (github.com/Mutinifni/splitwise-sim), the paper's simulator: notebooks/utils.py
# prices a GPU-hour at $2.21 (A100) and $4.76 (H100) and notebooks/plots.ipynb `get_slo` gives the
# SLOs as slowdowns against the request alone on a DGX-A100 (TP 8), at p50 / p90 / p99.
USD_PER_MACHINE_HOUR = {"dgx-a100": 8 * 2.21, "dgx-h100": 8 * 4.76}
SPLITWISE_SLO = {"ttft": (2.0, 3.0, 6.0), "tbt": (1.25, 1.5, 5.0), "e2e": (1.25, 1.5, 5.0)}
H100_CAP_W = 0.7 * 700  # Splitwise-HHcap: token machines capped at 70% (dgx-h100-pcap: 7140 of 10200 W)

# The smallest units with the prompt:token machine ratios of SplitwiseSim's iso-power clusters
# (notebooks/plots.ipynb): conversation AA 45:25, HH 25:15, HA 25:26, HHcap 25:21; coding AA 55:15,
# HH 35:5, HA 35:8, HHcap 35:7. Baselines are two mixed machines. Capacities are per unit and
# compared per kW of GPU nameplate power and per dollar (a cluster of n units serves n times the rate).
SPLITWISE_UNITS = {  # design: (prompt machines, token machines)
    "conv": {"Splitwise-AA": (2, 1), "Splitwise-HH": (2, 1), "Splitwise-HA": (1, 1),
             "Splitwise-HHcap": (1, 1)},
    "code": {"Splitwise-AA": (4, 1), "Splitwise-HH": (7, 1), "Splitwise-HA": (4, 1),
             "Splitwise-HHcap": (5, 1)},
}
SPLITWISE_HARDWARE = {  # (prompt machine, token machine)
    "Splitwise-AA": ("dgx-a100", "dgx-a100"), "Splitwise-HH": ("dgx-h100", "dgx-h100"),
    "Splitwise-HA": ("dgx-h100", "dgx-a100"), "Splitwise-HHcap": ("dgx-h100", "dgx-h100-capped"),
}
BASELINE_MACHINES = 2


@dataclass(frozen=True)
class Design:
    name: str
    machines: tuple[tuple[str, int], ...]
    """(machine, count): dgx-a100, dgx-h100 or dgx-h100-capped."""
    serve_kwargs: dict[str, Any]

    @property
    def power_kw(self) -> float:
        """GPU nameplate power (8 GPUs at their maximum, or at the cap)."""
        return sum(count * _system(m).num_devices * _system(m).device.power.max
                   for m, count in self.machines) / 1e3

    @property
    def usd_per_hour(self) -> float:
        return sum(count * USD_PER_MACHINE_HOUR[m.replace("-capped", "")] for m, count in self.machines)

    def describe(self) -> str:
        return " + ".join(f"{count} {m}" for m, count in self.machines)


@cache
def _system(machine: str) -> System:
    if machine == "dgx-h100-capped":
        system = load_system("dgx-h100")
        return system.model_copy(update={"device": power_capped(system.device, H100_CAP_W)})
    return load_system(machine)


def splitwise_designs(trace: str) -> list[Design]:
    designs = [Design(f"Baseline-{hw[4:].upper()}", ((hw, BASELINE_MACHINES),),
                      {"hardware": hw, "parallel": ParallelPlan(tp=8, dp=BASELINE_MACHINES)})
               for hw in ("dgx-a100", "dgx-h100")]
    for name, (prompts, tokens) in SPLITWISE_UNITS[trace].items():
        prompt_hw, token_hw = SPLITWISE_HARDWARE[name]
        machines = ((prompt_hw, prompts), (token_hw, tokens))
        designs.append(Design(name, machines, {
            "hardware": prompt_hw, "parallel": TP8, "prefill_hardware": _system(prompt_hw),
            "decode_hardware": _system(token_hw), "prefill_replicas": prompts, "decode_replicas": tokens}))
    return designs


@cache
def _alone_cost() -> ReplicaCost:
    """Llama-2-70B fp16 on one DGX-A100 (TP 8): the request-alone reference of the SLOs."""
    system = load_system("dgx-a100")
    precision = resolve_precision(system.device, "fp16", None, "fp16", 128)
    return ReplicaCost(load_model("llama-2-70b"), system, precision, "flash", TP8, max_tokens=LLAMA_CONTEXT,
                       max_context=LLAMA_CONTEXT + 1)


@cache
def _alone_ttft_s(prompt: int) -> float:
    return _alone_cost().prefill_alone_s(prompt)


@cache
def _alone_tbt_s(context: int) -> float:
    empty = np.zeros(0, dtype=np.int64)
    return _alone_cost().iteration(empty, empty, np.array([context]), 1)[0]


def splitwise_slowdowns(records: ServeRecords) -> dict[str, np.ndarray]:
    """Per request: TTFT, mean TBT and E2E over the same request alone on a DGX-A100."""
    done = records.completed
    prompt = done["prompt_tokens"].to_numpy()
    output = done["output_tokens"].to_numpy()
    ttft0 = np.array([_alone_ttft_s(int(p)) for p in prompt])
    tbt0 = np.array([_alone_tbt_s(int(p + o // 2)) for p, o in zip(prompt, output, strict=True)])
    ttft = (done["first_token_s"] - done["arrival_s"]).to_numpy()
    e2e = (done["completion_s"] - done["arrival_s"]).to_numpy()
    decoding = output > 1
    tbt = (done["completion_s"] - done["first_token_s"]).to_numpy()[decoding] / (output[decoding] - 1)
    return {"ttft": ttft / ttft0, "tbt": tbt / tbt0[decoding], "e2e": e2e / (ttft0 + tbt0 * (output - 1))}


def meets_splitwise_slo(records: ServeRecords) -> bool:
    if len(records.completed) < len(records.requests):
        return False
    slowdowns = splitwise_slowdowns(records)
    return all(np.all(np.percentile(slowdowns[k], (50, 90, 99)) <= np.array(limits))
               for k, limits in SPLITWISE_SLO.items())


def splitwise_workload(trace: str, rate: float, duration_s: float, seed: int = 0) -> Workload:
    """Poisson arrivals with lengths sampled from the Azure trace, as SplitwiseSim's generate_trace.py
    builds its rr_code / rr_conv traces, clipped to Llama-2's context."""
    return poisson_workload(AZURE / f"splitwise_{trace}.csv", rate, duration_s, LLAMA_CONTEXT, seed)


SPLITWISE_SCHEDULER = SchedulerConfig(policy="continuous", max_batch_tokens=LLAMA_CONTEXT)


# Seconds of arrivals per probe: long enough for queues to build when a design is overloaded
# (a coding request lasts about a second, a conversation several), short enough to run quickly.
SPLITWISE_DURATION_S = {"code": 20.0, "conv": 40.0}


def splitwise_serve(design: Design, trace: str, rate: float, duration_s: float | None = None,
                    seed: int = 0) -> ServeRecords:
    workload = splitwise_workload(trace, rate, duration_s or SPLITWISE_DURATION_S[trace], seed)
    return serve("llama-2-70b", workload=workload, scheduler=SPLITWISE_SCHEDULER, **design.serve_kwargs,
                 **FP16)


def splitwise_capacity(design: Design, trace: str, duration_s: float | None = None, bisections: int = 2,
                       seed: int = 0) -> float:
    """Highest request rate of one design unit within the Splitwise SLOs."""
    def meets(rate: float) -> bool:
        return meets_splitwise_slo(splitwise_serve(design, trace, rate, duration_s, seed))

    # Start at about 1.3 requests a second per DGX-A100's worth of power.
    return highest_rate(meets, 0.4 * design.power_kw, bisections=bisections)


def splitwise(seed: int = 0) -> None:
    print("\nSplitwise (Llama-2-70B fp16, TP 8 per machine; capacity: the highest rate within the SLOs)\n")
    header("trace", "design", "machines", "GPU kW", "$/h", "capacity (req/s)", "per kW vs Baseline-A100",
           "per $ vs Baseline-A100", "per kW vs Baseline-H100", "per $ vs Baseline-H100")
    summaries = []
    for trace in ("code", "conv"):
        results = [(d, splitwise_capacity(d, trace, seed=seed)) for d in splitwise_designs(trace)]
        per_kw = {d.name: c / d.power_kw for d, c in results}
        per_usd = {d.name: c / d.usd_per_hour for d, c in results}
        for d, cap in results:
            row(trace, d.name, d.describe(), f"{d.power_kw:.2f}", f"{d.usd_per_hour:.0f}", f"{cap:.2f}",
                *(f"{ratio[d.name] / ratio[base]:.2f}x" for base in ("Baseline-A100", "Baseline-H100")
                  for ratio in (per_kw, per_usd)))
        best = max((n for n in per_usd if n.startswith("Splitwise")), key=lambda n: per_usd[n])
        summaries.append(
            f"{trace}: at the same machines (same power and cost) Splitwise-AA serves "
            f"{per_kw['Splitwise-AA'] / per_kw['Baseline-A100']:.2f}x Baseline-A100 and Splitwise-HH "
            f"{per_kw['Splitwise-HH'] / per_kw['Baseline-H100']:.2f}x Baseline-H100; per dollar the best "
            f"split, {best}, serves {per_usd[best] / per_usd['Baseline-H100']:.2f}x Baseline-H100")
    print()
    for line in summaries:
        print(line)


# --- POLCA: more servers under a provisioned power budget --------------------------------------

DGX_A100_SYSTEM_W = 6500  # NVIDIA DGX A100 datasheet, maximum system power (SplitwiseSim: tdp 6500)
POLCA_BUDGET_SERVERS = 40  # the budget provisions this many DGX-A100s at their nameplate


def polca_workload(requests: int = 150, servers: int = 2, per_server: float = 1.4) -> Workload:
    """The conversation trace's first requests with their own arrival times, scaled so each server
    sees ``per_server`` requests a second (the trace is one service's traffic, not sized to a
    server count)."""
    path = AZURE / "splitwise_conv.csv"
    own = read_trace(path, max_requests=requests)
    rate = (len(own) - 1) / float(own.arrival_s[-1] - own.arrival_s[0])
    return clip_lengths(read_trace(path, max_requests=requests, time_scale=rate / (per_server * servers)),
                        max_total=LLAMA_CONTEXT)


def polca_run(cap_w: float | None, requests: int = 150, servers: int = 2) -> dict:
    """Serve the trace on ``servers`` DGX-A100s with every GPU capped at ``cap_w``; how many servers
    a budget of POLCA_BUDGET_SERVERS nameplate servers holds at the nameplate, at the cap and at
    the simulated peak (the rest of a server, 6.5 kW less its GPUs, provisioned at its maximum)."""
    system = load_system("dgx-a100")
    gpus, gpu_max = system.num_devices, system.device.power.max
    records = serve("llama-2-70b", "dgx-a100", polca_workload(requests, servers),
                    scheduler=SPLITWISE_SCHEDULER, parallel=ParallelPlan(tp=8, dp=servers), power_cap_w=cap_w,
                    **FP16)
    summary = records.summary()
    peak = summary["power_w"]["peak"] / servers
    fit = servers_under_budget(POLCA_BUDGET_SERVERS * DGX_A100_SYSTEM_W, gpus, gpu_max, cap_w, peak,
                               DGX_A100_SYSTEM_W - gpus * gpu_max)
    return {"cap_w": cap_w, "summary": summary, "budget": fit, "gpu_peak_w": peak / gpus}


def polca() -> None:
    print(f"\nPOLCA (Llama-2-70B fp16 on DGX-A100s, TP 8; conversation trace; a budget of "
          f"{POLCA_BUDGET_SERVERS} x {DGX_A100_SYSTEM_W / 1e3:.1f} kW)\n")
    header("provisioning", "per-GPU peak drawn", "servers in the budget", "TTFT p50 / p99 (s)",
           "TBT p50 / p99 (ms)", "tokens/s")

    def latencies(run: dict) -> tuple[str, str, str]:
        s = run["summary"]
        return (f"{s['ttft_s']['p50']:.3f} / {s['ttft_s']['p99']:.3f}",
                f"{s['tbt_s']['p50'] * 1e3:.1f} / {s['tbt_s']['p99'] * 1e3:.1f}",
                f"{s['throughput_tokens_per_s']:.0f}")

    base = polca_run(None)
    nameplate = base["budget"]["servers_at_nameplate"]
    row("nameplate (400 W per GPU)", f"{base['gpu_peak_w']:.0f} W", nameplate, *latencies(base))
    fit = base["budget"]["servers_at_observed_peak"]
    row("at the simulated peak, uncapped", f"{base['gpu_peak_w']:.0f} W",
        f"{fit} ({fit / nameplate - 1:+.0%})", *latencies(base))
    # A cap makes the budget safe whatever the load; capping at the peak drawn uncapped (rounded up)
    # guarantees the servers that fit at that peak.
    for cap in (300.0, 10 * math.ceil(base["gpu_peak_w"] / 10)):
        run = polca_run(cap)
        fit = run["budget"]["servers_capped"]
        row(f"capped at {cap:.0f} W per GPU", f"{run['gpu_peak_w']:.0f} W",
            f"{fit} ({fit / nameplate - 1:+.0%})", *latencies(run))


# --- Sarathi-Serve: chunked prefill against prefill priority -----------------------------------

# Sarathi-Serve's artifact (github.com/microsoft/sarathi-serve, osdi-experiments/figure-5-6):
# Mistral-7B on one A100 80 GB, at most 128 sequences a batch; capacity is the highest rate with
# P99 TBT within 0.1 s (strict, Sarathi-Serve with chunks of 512) or 0.5 s (relaxed, chunks of
# 2048) and median scheduling delay within 2 s; vLLM is run under both.
VLLM = SchedulerConfig(policy="continuous", max_batch=128)
SARATHI = {"strict": SchedulerConfig(policy="chunked", chunk_size=512, max_batch=128),
           "relaxed": SchedulerConfig(policy="chunked", chunk_size=2048, max_batch=128)}
SARATHI_TBT_SLO_S = {"strict": 0.1, "relaxed": 0.5}
SARATHI_DELAY_SLO_S = 2.0
SARATHI_REQUESTS = 200  # at least this many per probe (Sarathi-Serve's runs: 2,048)


def sarathi_serve(scheduler: SchedulerConfig, rate: float, requests: int = SARATHI_REQUESTS,
                  seed: int = 0) -> ServeRecords:
    workload = poisson_workload(ARXIV, rate, requests / rate, seed=seed)
    return serve("mistral-7b", "a100-80gb-sxm", workload, scheduler)


def saturation_rate(scheduler: SchedulerConfig, requests: int = 2 * SARATHI_REQUESTS, rate: float = 8.0,
                    seed: int = 0) -> float:
    """Requests a second the server completes when arrivals outpace it (busy from the first
    arrival to the last completion, but for the ramp at either end)."""
    return sarathi_serve(scheduler, rate, requests, seed).summary()["throughput_requests_per_s"]


def sarathi_meets(records: ServeRecords, tbt_slo_s: float) -> bool:
    """P99 TBT within the SLO and median scheduling delay within 2 s (over the later half of the
    arrivals: in a short run the first requests find an empty server)."""
    req = records.requests.sort_values("arrival_s")
    later = req.iloc[len(req) // 2:]
    delay = float(np.median(later["scheduled_s"] - later["arrival_s"]))
    return delay <= SARATHI_DELAY_SLO_S and float(np.percentile(records.token_gaps_s, 99)) <= tbt_slo_s


class SarathiProbes:
    """Serving runs of one scheduler, kept by rate, and the capacity under an SLO.

    A run of a few hundred requests cannot show a queue that grows by a few requests a minute:
    with 128 sequences a batch, an overloaded server admits the excess and the scheduling delay
    stays short. Sarathi-Serve's runs of 2,048 requests show more of it; here a rate above the
    saturation rate (measured under overload) counts as missing the SLO."""

    def __init__(self, scheduler: SchedulerConfig, requests: int = SARATHI_REQUESTS, seed: int = 0):
        self.scheduler, self.requests, self.seed = scheduler, requests, seed
        self.runs: dict[float, ServeRecords] = {}
        self.saturation = saturation_rate(scheduler, 2 * requests, seed=seed)

    def run(self, rate: float) -> ServeRecords:
        if rate not in self.runs:
            self.runs[rate] = sarathi_serve(self.scheduler, rate, self.requests, self.seed)
        return self.runs[rate]

    def capacity(self, slo: str, start: float = 1.0) -> float:
        return highest_rate(lambda rate: rate <= self.saturation
                            and sarathi_meets(self.run(rate), SARATHI_TBT_SLO_S[slo]), start, bisections=3)


def sarathi(seed: int = 0) -> None:
    print("\nSarathi-Serve (Mistral-7B on one A100-80GB, arXiv-summarization lengths, Poisson arrivals)\n")
    header("SLO", "scheduler", "capacity", "saturation", "at 1 req/s: TBT p50 / p99 (ms)",
           "TTFT p50 / p99 (s)")
    vllm = SarathiProbes(VLLM, seed=seed)
    for slo, scheduler in SARATHI.items():
        chunked = SarathiProbes(scheduler, seed=seed)
        found = {}
        for name, probes in ((f"vLLM, {VLLM.max_batch} sequences", vllm),
                             (f"Sarathi-Serve, chunks of {scheduler.chunk_size}", chunked)):
            found[name] = probes.capacity(slo)
            s = probes.run(1.0).summary()
            row(f"{slo}: P99 TBT {SARATHI_TBT_SLO_S[slo]} s", name, f"{found[name]:.2f} req/s",
                f"{probes.saturation:.2f} req/s",
                f"{s['tbt_s']['p50'] * 1e3:.1f} / {s['tbt_s']['p99'] * 1e3:.0f}",
                f"{s['ttft_s']['p50']:.2f} / {s['ttft_s']['p99']:.2f}")
        base, better = found.values()
        print(f"| {slo} | Sarathi-Serve / vLLM | {better / base:.2f}x | | | |")


# --- MoE-Lens: how far an offloaded MoE is from its hardware bound -----------------------------

def moe_bound(model: str = "mixtral-8x7b", hardware: str = "gcp-t4-flexgen", prompt: int = 512,
              output: int = 128) -> dict:
    """Decode tokens/s an offloaded MoE cannot exceed (MoE-Lens's stage-1 reasoning, our arithmetic):
    every step streams the weights the GPU cannot hold over PCIe; the host holds those weights and
    every sequence's KV cache, which bounds the batch; the GPU computes the batch's expert and
    attention projections; the CPU reads each sequence's cache for attention (KV stays on the host).

        B   = (host memory - streamed weights) / (KV per token * (prompt + output))
        T   = max(streamed / link rate, B * 2 * active params / GPU peak,
                  B * KV per token * (prompt + output / 2) / host memory bandwidth)
        tokens/s <= B / T
    """
    spec, system = load_model(model), load_system(hardware)
    precision = resolve_precision(system.device, "fp16", None, "fp16", 128)
    weights = weight_bytes(spec, precision)
    streamed = max(0.0, weights - system.device.main_memory.capacity)
    kv = kv_bytes_per_token(spec, precision.kv)
    assert system.host is not None and system.links.host_device is not None
    batch = (system.host.memory.capacity - streamed) / (kv * (prompt + output))
    stages = {"PCIe (weights)": streamed / system.links.host_device.rate,
              "GPU compute": batch * 2 * spec.params(active=True) / system.device.compute[precision.compute],
              "CPU attention (KV reads)": batch * kv * (prompt + output / 2) / system.host.memory.bandwidth}
    bound = max(stages, key=lambda k: stages[k])
    return {"batch": batch, "step_s": stages[bound], "bound": bound, "tokens_per_s": batch / stages[bound]}


def moe_planned(model: str = "mixtral-8x7b", hardware: str = "gcp-t4-flexgen", prompt: int = 512,
                output: int = 128) -> dict:
    """The simulator's best offload plan for throughput (``infersim plan``)."""
    choice = search(model, hardware, input_len=prompt, output_len=output, max_batch=1024, **FP16)
    r = choice.result
    return {"batch": choice.batch, "decode_tokens_per_s": choice.batch / r.tpot_s,
            "tokens_per_s": r.throughput_tokens_per_s, "binding": ", ".join(choice.binding)}


def moe_lens() -> None:
    print("\nMoE-Lens-style bound (Mixtral-8x7B fp16 on FlexGen's T4 + 208 GB machine, 512 in / 128 out)\n")
    bound, planned = moe_bound(), moe_planned()
    header("", "batch", "decode tokens/s", "end-to-end tokens/s", "bound by")
    row("hardware bound (KV and attention on the CPU)", f"{bound['batch']:.0f}",
        f"{bound['tokens_per_s']:.0f}", "-", bound["bound"])
    row("simulator's best offload plan (KV moved to the GPU)", planned["batch"],
        f"{planned['decode_tokens_per_s']:.1f}", f"{planned['tokens_per_s']:.1f}", planned["binding"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0,
                        help="draw of the synthetic requests (Splitwise, Sarathi-Serve); 0 is documented")
    parser.add_argument("--only", choices=("splitwise", "polca", "sarathi", "moe-lens"), action="append",
                        help="run only these sections (repeatable)")
    args = parser.parse_args()
    sections = {"splitwise": lambda: splitwise(args.seed), "polca": polca,
                "sarathi": lambda: sarathi(args.seed), "moe-lens": moe_lens}
    for name, section in sections.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        section()
        print(f"\n({name}: {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
