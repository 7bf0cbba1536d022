"""Print the simulator's side of the test-time compute rows of docs/reproductions.md (issue 9).

    python -m docs.reproduce_ttc                      # every table; figures into docs/img/
    python -m docs.reproduce_ttc --only kinetics      # or iso-cost, genz

- **Kinetics** (Sadhukhan et al. 2025): attention's share of a decode step as outputs grow, for a
  small and a large model, from ``estimate``'s per-op results, beside the share Kinetics' eFLOPs
  cost model gives the same models (its formula, from its code, evaluated here).
- **Iso-cost** (``workloads/sweeps/test-time-compute.yaml``): what a prompt costs with N samples of
  L tokens on Llama-3.1-8B and -70B, each on its cheapest plan, and how many samples each model
  affords within a budget.
- **GenZ** (Bambhaniya et al. 2024): the memory bandwidth and compute a platform needs for
  LLaMA3-70B to meet a use case's TPOT and TTFT, beside GenZ's own figures (its notebook
  ``Paper charts/Sec 7. Platform Requirements.ipynb`` at commit 12bd09f).

Nothing here is fitted to the papers.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from simulator import estimate, sweep  # noqa: E402
from simulator.errors import DoesNotFitError  # noqa: E402
from simulator.result import EstimateResult  # noqa: E402
from simulator.specs.hardware import System  # noqa: E402
from simulator.specs.loader import load_model, load_system  # noqa: E402
from simulator.specs.model import ModelSpec  # noqa: E402
from simulator.study.options import load_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
SWEEP = ROOT / "workloads" / "sweeps" / "test-time-compute.yaml"
SMALL, LARGE = "llama-3.1-8b", "llama-3.1-70b"
PROMPT = 512
OUTPUTS = (1024, 2048, 4096, 8192, 16384, 32768)
KINETICS_DEVICE = "b200"
"""Kinetics states its cost model for a B200; both models fit one in bf16 (no collectives)."""
KINETICS_INTENSITY = 562.5
"""FLOPs per byte Kinetics' eFLOPs charge for a byte of KV cache read (its ``E_flops``, B200)."""


def _save(fig: plt.Figure, name: str) -> None:
    """Lay out ``fig``, write it to docs/img/NAME and close it."""
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / name, dpi=120)
    plt.close(fig)
    print(f"wrote {IMG / name}")


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")


def header(*names: str) -> None:
    row(*names)
    row(*("---" for _ in names))


# --- Kinetics: attention's share of decode time ----------------------------------------------

def attention_share(result: EstimateResult) -> float:
    """Attention kernels' share of the mean decode step (``estimate``'s per-op results)."""
    ops = result.ops_frame()
    decode = ops[ops.phase == "decode"]
    return float(decode[decode.kind.isin(["attention", "softmax"])].time_s.sum() / result.decode.time_s)


def kinetics_share(model: ModelSpec, input_len: int, output_len: int, samples: int = 1,
                   intensity: float = KINETICS_INTENSITY) -> float:
    """Attention's share of Kinetics' eFLOPs (its ``cost_model/utils.py`` ``dense_cost``):
    ``2 N P L_out`` for the parameters, ``2 N (2 L_in + L_out) L_out H d L`` attention FLOPs, and
    ``2 (2 L_in + N L_out) L_out D`` bytes of bf16 KV read (the prompt read once for all N samples)
    times ``intensity``; no weight reads (a large batch amortizes them). ``D = kv_heads x d x
    layers``; ``P`` the parameters a token multiplies (all but the input embedding)."""
    params = model.params(active=True) - model.embedding_params()
    d, layers = model.head_size, model.num_layers
    linear = 2.0 * samples * params * output_len
    heads = model.num_attention_heads
    attention_flops = 2.0 * samples * (2 * input_len + output_len) * output_len * heads * d * layers
    kv_bytes = 2.0 * (2 * input_len + samples * output_len) * output_len * model.kv_heads * d * layers
    attention = attention_flops + intensity * kv_bytes
    return attention / (linear + attention)


def largest_batch(model: str, hardware: str, output_len: int, samples: int = 1) -> int:
    """The most prompts that fit the device at this shape (doubling, then bisection)."""
    def fits(batch: int) -> bool:
        try:
            estimate(model, hardware, batch=batch, input_len=PROMPT, output_len=output_len, samples=samples)
        except DoesNotFitError:
            return False
        return True

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


@cache
def kinetics_rows() -> pd.DataFrame:
    """Per model and output length: our attention share at batch 1 and at the largest batch that
    fits one B200, and Kinetics' (its formula on the same model, one sample)."""
    records = []
    for model in (SMALL, LARGE):
        spec = load_model(model)
        for output_len in OUTPUTS:
            one = estimate(model, KINETICS_DEVICE, batch=1, input_len=PROMPT, output_len=output_len)
            most = largest_batch(model, KINETICS_DEVICE, output_len)
            full = estimate(model, KINETICS_DEVICE, batch=most, input_len=PROMPT, output_len=output_len)
            records.append({"model": model, "output_len": output_len, "batch_1": attention_share(one),
                            "max_batch": most, "at_max_batch": attention_share(full),
                            "kinetics": kinetics_share(spec, PROMPT, output_len)})
    return pd.DataFrame.from_records(records)


def kinetics() -> None:
    frame = kinetics_rows()
    print(f"Attention's share of a decode step, {PROMPT}-token prompt, one {KINETICS_DEVICE}, bf16:")
    header("model", "output tokens", "ours, batch 1", "ours, largest batch that fits",
           "Kinetics' eFLOPs, same model")
    for r in frame.itertuples():
        row(r.model, f"{r.output_len:,}", f"{r.batch_1:.0%}", f"{r.at_max_batch:.0%} (batch {r.max_batch})",
            f"{r.kinetics:.0%}")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for model, color in ((SMALL, "tab:blue"), (LARGE, "tab:red")):
        part = frame[frame.model == model]
        ax.plot(part.output_len, part.batch_1, "o-", color=color, label=f"{model}, batch 1")
        ax.plot(part.output_len, part.at_max_batch, "s-", color=color, alpha=0.6,
                label=f"{model}, largest batch")
        ax.plot(part.output_len, part.kinetics, "--", color=color, label=f"{model}, Kinetics' formula")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("attention share of a decode step")
    ax.set_ylim(0, 1)
    ax.set_title(f"Attention's share of decode ({KINETICS_DEVICE}, {PROMPT}-token prompt)")
    ax.legend(fontsize=7)
    _save(fig, "ttc_attention_share.png")


# --- iso-cost: a larger model with fewer samples or a smaller one with more --------------------

def iso_cost_frame(samples: tuple[int, ...] | None = None) -> pd.DataFrame:
    """The cheapest feasible plan per model, samples and output length in the sweep file (only
    the given ``samples``, for a quicker run)."""
    configs = load_sweep(SWEEP)
    if samples is not None:
        configs = configs[configs.samples.isin(samples)]
    frame = sweep(rows=configs.reset_index(drop=True))
    frame = frame[frame.feasible & frame.cost_usd_per_request.notna()]
    best = frame.loc[frame.groupby(["model", "samples", "output_len"]).cost_usd_per_request.idxmin()]
    return best[["model", "samples", "output_len", "tp", "batch", "tpot_s", "e2e_s",
                 "cost_usd_per_request"]].reset_index(drop=True)


def cost_ratio(best: pd.DataFrame) -> pd.DataFrame:
    """Cost per request of the large model over the small one at equal samples and output length:
    how many small-model answers one large-model answer costs."""
    table = best.pivot_table(index="samples", columns=["output_len", "model"], values="cost_usd_per_request")
    return pd.DataFrame({length: table[(length, LARGE)] / table[(length, SMALL)]
                         for length in sorted(best.output_len.unique())})


def affordable(best: pd.DataFrame, budget: float, output_len: int) -> dict[str, int]:
    """Per model, the most samples (of those swept) whose cheapest plan costs at most ``budget``
    per prompt at ``output_len`` tokens (0: not even one)."""
    out = {}
    for model in (SMALL, LARGE):
        part = best[(best.model == model) & (best.output_len == output_len)
                    & (best.cost_usd_per_request <= budget)]
        out[model] = int(part.samples.max()) if len(part) else 0
    return out


def iso_cost() -> None:
    best = iso_cost_frame()
    ratio = cost_ratio(best)
    print(f"Cost per prompt of {LARGE} over {SMALL} (cheapest plan of each on dgx-h100; "
          f"{SWEEP.relative_to(ROOT)}):")
    header("samples", *(f"{length:,} tokens" for length in ratio.columns))
    for samples, values in ratio.iterrows():
        row(samples, *("n/a (does not fit)" if math.isnan(v) else f"{v:.2f}x" for v in values))
    print()
    print("Most samples per prompt within a budget (cheapest plan), 8,192 generated tokens:")
    header("budget per prompt", SMALL, LARGE)
    most = int(best.samples.max())
    for budget in (0.005, 0.02, 0.05, 0.2, 1.0):
        counts = affordable(best, budget, 8192)
        row(f"${budget:g}", *(f"{counts[m]} (the most swept)" if counts[m] == most else counts[m]
                              for m in (SMALL, LARGE)))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for model, color in ((SMALL, "tab:blue"), (LARGE, "tab:red")):
        for length, style in ((2048, ":"), (8192, "--"), (32768, "-")):
            part = best[(best.model == model) & (best.output_len == length)].sort_values("samples")
            ax.plot(part.samples, part.cost_usd_per_request, style, marker="o", color=color, markersize=3,
                    label=f"{model}, {length:,} tokens")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("samples per prompt")
    ax.set_ylabel("USD per prompt (cheapest plan)")
    ax.set_title("Best-of-N cost per prompt, dgx-h100")
    ax.legend(fontsize=7)
    _save(fig, "ttc_iso_cost.png")


# --- GenZ: platform requirements for a use case ------------------------------------------------

@dataclass(frozen=True)
class UseCase:
    """A GenZ use case (``Paper charts/variables.py``): batch 1, ``beams`` sequences per prompt,
    the lengths, and the TTFT and TPOT targets. GenZ's LLaMA3-70B figures from its notebook's
    printed tables: decode bandwidth (its "TB/s": MiB / 1e6 per second), prefill PFLOP/s, and
    weights plus KV cache (MiB)."""

    name: str
    beams: int
    input_len: int
    output_len: int
    ttft_s: float
    tpot_s: float
    genz_bandwidth: float
    genz_pflops: float
    genz_memory_mib: float


USE_CASES = (
    UseCase("QA", 4, 1000, 200, 0.2, 0.010, 6.603, 0.698, 65280 + 750),
    UseCase("Chat bots", 2, 3000, 1000, 0.2, 0.010, 6.653, 2.171, 65280 + 1250),
    UseCase("QA + RAG", 4, 10000, 200, 0.4, 0.010, 7.1655, 4.078, 65280 + 6375),
    UseCase("Summarization", 4, 15000, 1000, 2.0, 0.020, 3.764, 1.322, 65280 + 10000),
    UseCase("Code generation", 4, 20000, 50, 5.0, 0.020, 3.890562, 0.757, 65280 + 12531.25),
)
GENZ_MODEL = "llama-3.1-70b"
"""GenZ's ``LLaMA_70b`` (plotted as LLaMA3-70B): the same shape as Llama-3.1-70B."""
ONE_BYTE = {"weight_dtype": "fp8", "kv_dtype": "fp8"}
"""GenZ's ``bits='int8'``: one byte per weight and KV value, no group scales (our int8 carries them)."""


def with_bandwidth(system: System, bandwidth: float) -> System:
    """``system`` with its device's main memory at ``bandwidth`` bytes/s, all else as it is."""
    device = system.device
    memory = (device.main_memory.model_copy(update={"bandwidth": bandwidth}), *device.memory[1:])
    return system.model_copy(update={"device": device.model_copy(update={"memory": memory})})


UNLIMITED = 1e15
"""Bytes/s standing for an unlimited memory bandwidth (1,000 TB/s)."""


def decode_tpot(case: UseCase, system: System, bandwidth: float) -> float:
    return estimate(GENZ_MODEL, with_bandwidth(system, bandwidth), batch=1, samples=case.beams,
                    input_len=case.input_len, output_len=case.output_len, check_memory=False,
                    **ONE_BYTE).tpot_s


def bandwidth_for(case: UseCase, system: System) -> float:
    """The main-memory bandwidth at which our TPOT meets the target on ``system``'s device, the
    rest of it unchanged (bisection); NaN when no bandwidth does (compute and kernel overheads
    alone exceed the target)."""
    if decode_tpot(case, system, UNLIMITED) > case.tpot_s:
        return math.nan
    low, high = 1e11, UNLIMITED
    for _ in range(60):
        middle = math.sqrt(low * high)
        low, high = (low, middle) if decode_tpot(case, system, middle) <= case.tpot_s else (middle, high)
    return high


@cache
def genz_rows(hardware: str = "h100-sxm") -> pd.DataFrame:
    system = load_system(hardware)
    records = []
    for case in USE_CASES:
        result = estimate(GENZ_MODEL, system, batch=1, samples=case.beams, input_len=case.input_len,
                          output_len=case.output_len, check_memory=False, **ONE_BYTE)
        ops = result.ops_frame()
        decode_bytes = ops[ops.phase == "decode"].bytes.sum()
        prefill_flops = ops[ops.phase == "prefill"].flops.sum()
        records.append({
            "use_case": case.name, "beams": case.beams, "lengths": f"{case.input_len}/{case.output_len}",
            "tpot_target_s": case.tpot_s, "ttft_target_s": case.ttft_s,
            "genz_bandwidth_printed": case.genz_bandwidth,
            "genz_bandwidth_si": case.genz_bandwidth * 2**20 / 1e6,
            "ideal_bandwidth": decode_bytes / case.tpot_s / 1e12,
            "bandwidth_on_device": bandwidth_for(case, system) / 1e12,
            "tpot_floor_s": decode_tpot(case, system, UNLIMITED),
            "tpot_on_device_s": result.tpot_s,
            "genz_pflops": case.genz_pflops, "ideal_pflops": prefill_flops / case.ttft_s / 1e15,
            "ttft_on_device_s": result.ttft_s,
            "genz_memory_gb": case.genz_memory_mib * 2**20 / 1e9,
            "memory_gb": (result.memory.weights + result.memory.kv_cache) / 1e9,
        })
    return pd.DataFrame.from_records(records)


def genz(hardware: str = "h100-sxm") -> None:
    frame = genz_rows(hardware)
    print(f"Decode: memory bandwidth for {GENZ_MODEL} (1-byte weights and KV) to meet the TPOT target:")
    header("use case", "beams, in/out", "TPOT target", "GenZ (printed; SI)", "ours, bytes per step / target",
           f"ours, bandwidth a {hardware} would need", f"ours, TPOT on a {hardware}")
    for r in frame.itertuples():
        need = (f"none (TPOT {r.tpot_floor_s * 1e3:.1f} ms at unlimited bandwidth)"
                if math.isnan(r.bandwidth_on_device) else f"{r.bandwidth_on_device:.2f} TB/s")
        row(r.use_case, f"{r.beams}, {r.lengths}", f"{r.tpot_target_s * 1e3:.0f} ms",
            f"{r.genz_bandwidth_printed:.2f}; {r.genz_bandwidth_si:.2f} TB/s",
            f"{r.ideal_bandwidth:.2f} TB/s", need, f"{r.tpot_on_device_s * 1e3:.1f} ms")
    print()
    print("Prefill: compute to meet the TTFT target, and memory (weights + KV cache):")
    header("use case", "TTFT target", "GenZ", "ours, FLOPs / target", f"ours, TTFT on a {hardware}",
           "GenZ memory", "ours memory")
    for r in frame.itertuples():
        row(r.use_case, f"{r.ttft_target_s:g} s", f"{r.genz_pflops:.2f} PFLOP/s",
            f"{r.ideal_pflops:.2f} PFLOP/s", f"{r.ttft_on_device_s * 1e3:.0f} ms",
            f"{r.genz_memory_gb:.1f} GB", f"{r.memory_gb:.1f} GB")


SECTIONS = {"kinetics": kinetics, "iso-cost": iso_cost, "genz": genz}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=tuple(SECTIONS), help="one section")
    args = parser.parse_args()
    for name, section in SECTIONS.items():
        if args.only in (None, name):
            section()
            print()


if __name__ == "__main__":
    main()
