"""Print the simulator's side of the LLM-in-a-flash, XQuant and TPI-LLM rows of docs/reproductions.md.

    python docs/reproduce_memory.py

Nothing here is fitted to the papers. The M1 Max drive (6 GiB/s, 100 us per random read) is an
assumption: the paper reports a linear read above 6 GiB/s on an M2 and no latency.
"""

from __future__ import annotations

from simulator import load_device, load_model
from simulator.graph.transformer import Precision, embedding_bytes, kv_bytes_per_token, weight_bytes
from simulator.specs.hardware import Storage, System
from simulator.strategies.flash import FlashPlan
from simulator.strategies.parallel import shard_for_tp

M1_MAX_SSD = Storage(name="m1-max-ssd (assumed)", capacity=1e12, read_bandwidth=6 * 2**30,
                     write_bandwidth=5e9, latency=100e-6)


def row(paper: str, setting: str, theirs: str, ours: str) -> None:
    print(f"| {paper} | {setting} | {theirs} | {ours} |")


def flash_load_ms() -> float:
    # OPT-6.7B fp32: the predictor marks ~10% of neurons active, the k = 5 window leaves 2.4% of
    # them to load per token (so reuse = 1 - 2.4 / 10); 32 KiB bundled reads with 32 threads.
    model = load_model("opt-6.7b")
    system = System(name="m1-max", device=load_device("apple-m2-ultra"), storage=M1_MAX_SSD)
    return FlashPlan(active=0.10, reuse=0.76, queue_depth=32).read_s(model, system, 1, 4.0)["time_s"] * 1e3


def xquant_ratio(kv_dtype: str) -> float:
    model = load_model("llama-2-7b")
    return kv_bytes_per_token(model, "fp16") / kv_bytes_per_token(model, kv_dtype, 128, "x")


def tpi_llm_gb(window: int = 2) -> float:
    # Llama-2-70B in fp32 over 8 devices (tensor parallel), each holding a sliding window of 2
    # layers of its shard plus the embedding and head.
    model = load_model("llama-2-70b")
    shard, fp32 = shard_for_tp(model, 8), Precision(weight="fp32", kv="fp32", act="fp32", compute="fp32")
    per_layer = (weight_bytes(shard, fp32) - embedding_bytes(shard, fp32)) / model.num_layers
    return (window * per_layer + embedding_bytes(shard, fp32)) / 1e9


if __name__ == "__main__":
    print("| paper | setting | paper's figure | simulator |")
    print("|---|---|---|---|")
    row("LLM in a flash", "OPT-6.7B fp32 on an M1 Max, window 5, 32 KiB bundled reads",
        "125 ms per token loading from flash", f"{flash_load_ms():.0f} ms per token")
    for dtype, paper in (("fp16", "2x"), ("int4", "~7.7x (<0.1 perplexity)")):
        row("XQuant", f"Llama-2-7B, layer input cached in {dtype} vs K and V in fp16",
            f"{paper} memory saving", f"{xquant_ratio(dtype):.2f}x")
    row("TPI-LLM", "Llama-2-70B fp32 on 8 devices, sliding window of 2 layers",
        "3.1 GB per device", f"{tpi_llm_gb():.2f} GB per device")
