"""Print the simulator's side of the HybriMoE and ExpertFlow rows of docs/reproductions.md.

    python docs/reproduce_moe.py

Nothing here is fitted to the papers. HybriMoE's machine is `hybrimoe-a6000` (the host's memory
bandwidth is an assumption); ExpertFlow's is `expertflow-a40`, whose batch and lengths (8 sequences,
512 in, 128 out) are ours: the notes on the paper available here do not give them.

HybriMoE compares against kTransformers, which maps whole layers' experts to the GPU or the CPU
(the repository's `Mixtral-50%.yaml`: layers 0-15 on the GPU, 16-31 on the CPU for decode; every
expert computed on the GPU for prefill). Read on the simulator's terms:

- decode, kTransformers: the CPU's experts and the GPU's run one after the other (a layer is all
  CPU or all GPU), so a step is the device's compute plus the host's: ``decode.compute_s``;
  HybriMoE: missed experts run on the CPU beside the cached ones on the GPU (``--experts-on-host``),
  so a step is ``decode.time_s``. Routing is uniform in both: the same hits.
- prefill, kTransformers: experts outside the cache fetched when the router has chosen them;
  HybriMoE: the better of computing them on the CPU and fetching them a layer ahead
  (``--expert-prefetch 1``), chosen per prompt length.
"""

from __future__ import annotations

from statistics import mean

from simulator import estimate, load_model
from simulator.strategies.offload import OffloadPlan

HYBRIMOE = "hybrimoe-a6000"
EXPERTFLOW = "expertflow-a40"
CACHE_RATIOS = (0.25, 0.5, 0.75)  # HybriMoE's GPU expert cache ratios
PROMPTS = (32, 128, 512, 1024)    # HybriMoE's prefill input lengths ("around 32, 128, 512 and 1024")
INT4 = {"weight_dtype": "int4"}   # HybriMoE: Marlin 4-bit weights


def hybrimoe_decode(model_name: str, cache: float) -> tuple[float, float]:
    """(kTransformers-like, HybriMoE-like) seconds per generated token at batch 1."""
    model = load_model(model_name)
    plan = OffloadPlan.build(model, expert_cache=cache, experts_on_host=True)
    decode = estimate(model, HYBRIMOE, batch=1, input_len=128, output_len=64, offload=plan, **INT4).decode
    assert decode.compute_s is not None
    return decode.compute_s, decode.time_s


def hybrimoe_prefill(model_name: str, cache: float, prompt: int) -> tuple[float, float]:
    """(kTransformers-like, HybriMoE-like) time to first token in seconds at batch 1."""
    model = load_model(model_name)
    shape = dict(batch=1, input_len=prompt, output_len=2, **INT4)

    def ttft(**experts: object) -> float:
        return estimate(model, HYBRIMOE, offload=OffloadPlan.build(model, expert_cache=cache, **experts),
                        **shape).ttft_s

    return ttft(), min(ttft(experts_on_host=True), ttft(expert_prefetch=1.0))


def hybrimoe_speedups(model_name: str) -> dict[str, float]:
    """Mean speedup over the cache ratios (and prompt lengths), as HybriMoE averages its own."""
    decode = [k / h for k, h in (hybrimoe_decode(model_name, c) for c in CACHE_RATIOS)]
    prefill = [k / h for k, h in (hybrimoe_prefill(model_name, c, p) for c in CACHE_RATIOS for p in PROMPTS)]
    return {"decode": mean(decode), "decode_min": min(decode), "decode_max": max(decode),
            "prefill": mean(prefill), "prefill_min": min(prefill), "prefill_max": max(prefill)}


def expertflow_memory_gb(model_name: str) -> tuple[float, bool, float]:
    """(all weights on the GPU in GB, whether that fits the A40, the GPU's GB with no expert cached).

    With no expert cached the GPU holds the non-expert weights, one layer's experts in flight, the
    KV cache and activations: the floor any expert cache sits above."""
    model = load_model(model_name)
    shape = dict(batch=8, input_len=512, output_len=128, weight_dtype="fp16", check_memory=False)
    whole = estimate(model, EXPERTFLOW, **shape).memory
    floor = estimate(model, EXPERTFLOW, offload=OffloadPlan.build(model, expert_cache=0.0), **shape).memory
    return whole.total / 1e9, whole.total <= whole.capacity, floor.tiers["device"].used / 1e9


def _row(*cells: str) -> None:
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    print("| paper | setting | paper's figure | simulator |")
    print("|---|---|---|---|")
    for name in ("mixtral-8x7b", "deepseek-v2-lite"):
        s = hybrimoe_speedups(name)
        _row("HybriMoE", f"{name}, int4, A6000 + 10 Xeon cores, cache 25/50/75%, prompts 32-1024",
             "1.33x prefill over kTransformers (mean)",
             f"{s['prefill']:.2f}x ({s['prefill_min']:.2f}-{s['prefill_max']:.2f}x)")
        _row("HybriMoE", f"{name}, int4, A6000 + 10 Xeon cores, cache 25/50/75%, batch 1",
             "1.70x decode over kTransformers (mean)",
             f"{s['decode']:.2f}x ({s['decode_min']:.2f}-{s['decode_max']:.2f}x)")
    for name, paper in (("deepseek-moe-16b", "31.35 -> 6.38 GB (-79.6%)"),
                        ("qwen1.5-moe-a2.7b", "35.21 -> 6.52 GB (-81.5%)"),
                        ("mixtral-8x7b", "out of memory -> 15.99 GB")):
        whole, fits, floor = expertflow_memory_gb(name)
        base = f"{whole:.2f} GB" if fits else f"{whole:.1f} GB, does not fit"
        saved = f" (-{1 - floor / whole:.1%})" if fits else ""
        _row("ExpertFlow", f"{name} fp16 on an A40 48 GB, all on the GPU -> experts on the host",
             paper, f"{base} -> floor {floor:.2f} GB{saved}")
