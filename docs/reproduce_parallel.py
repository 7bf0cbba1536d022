"""Print the simulator's side of the parallelism and speculation rows of docs/reproductions.md.

    python docs/reproduce_parallel.py

Each row: the paper's setting, its figure, ours. Nothing here is fitted to the papers.
"""

from __future__ import annotations

from simulator import estimate
from simulator.cost.collectives import collective_time_s
from simulator.specs.loader import load_model, load_system
from simulator.strategies.offload import host_device
from simulator.strategies.parallel import ParallelPlan
from simulator.strategies.speculative import Speculation

FP16 = {"weight_dtype": "fp16", "act_dtype": "fp16"}
TP8 = ParallelPlan(tp=8)


def row(paper: str, setting: str, theirs: str, ours: str) -> None:
    print(f"| {paper} | {setting} | {theirs} | {ours} |")


def deepspeed() -> None:
    for batch, paper in ((1, 44.02), (8, 5.70), (16, 3.01), (32, 1.68), (64, 1.00), (128, 0.69)):
        r = estimate("bloom-176b", "dgx-a100", batch=batch, input_len=8, output_len=100, parallel=TP8, **FP16)
        ms = r.e2e_s / (batch * 100) * 1e3
        row("DeepSpeed-Inference", f"BLOOM-176B fp16, TP 8, 8x A100-80GB, batch {batch}, 100 new tokens",
            f"{paper} ms/token", f"{ms:.2f} ms/token ({ms / paper - 1:+.0%}); communication "
            f"{r.decode.communication_s / r.tpot_s:.0%} of a decode step")


def splitwise() -> None:
    for name, prompt, output, paper in (("coding", 1500, 13, {"dgx-a100": (185, 52), "dgx-h100": (95, 31)}),
                                        ("conversation", 1020, 129,
                                         {"dgx-a100": (155, 40), "dgx-h100": (84, 28)})):
        for hw, (ttft, tbt) in paper.items():
            r = estimate("llama-2-70b", hw, batch=1, input_len=prompt, output_len=output, parallel=TP8,
                         **FP16)
            row("Splitwise", f"Llama-2-70B, TP 8, {hw}, batch 1, {name} P50 ({prompt} in / {output} out)",
                f"TTFT {ttft} ms, TBT {tbt} ms",
                f"TTFT {r.ttft_s * 1e3:.0f} ms ({r.ttft_s * 1e3 / ttft - 1:+.0%}), "
                f"TBT {r.tpot_s * 1e3:.1f} ms ({r.tpot_s * 1e3 / tbt - 1:+.0%})")
    for hw in ("dgx-a100", "dgx-h100"):
        r = estimate("llama-2-70b", hw, prefill_hardware=hw, decode_hardware=hw, batch=1, input_len=1500,
                     output_len=13, parallel=TP8, **FP16)
        kv = r.strategy["disaggregation"]["kv_transfer"]
        row("Splitwise", f"KV transfer, 1500-token prompt, {hw} to {hw}, layer-wise",
            "< 7% of the prompt; ~8 ms (A100) / ~5 ms (H100) not overlapped",
            f"{kv['bytes'] / 1e6:.0f} MB in {kv['time_s'] * 1e3:.1f} ms ({kv['time_s'] / r.ttft_s:.1%} of "
            f"the prompt), {kv['exposed_s'] * 1e3:.2f} ms exposed")


def triforce() -> None:
    model = load_model("llama-2-7b").model_copy(update={"max_position_embeddings": 131072})
    shape = dict(batch=1, input_len=124928, output_len=256, check_memory=False)
    plain = estimate(model, "a100-80gb-sxm", **shape)
    for alpha in (0.8, 0.9):
        r = estimate(model, "a100-80gb-sxm", speculative=Speculation("self", 6, alpha, draft_kv_budget=4096),
                     **shape)
        row("TriForce", f"Llama2-7B-128K, A100, 124,928-token prompt, 4K-token self-draft, gamma 6, "
            f"alpha {alpha}", "up to 2.31x", f"{plain.tpot_s / r.tpot_s:.2f}x "
            f"({plain.tpot_s * 1e3:.1f} -> {r.tpot_s * 1e3:.1f} ms/token)")


def tokenweave() -> None:
    system = load_system("dgx-h100")
    for tokens, paper in ((1024, 137.2), (8192, 646.2)):
        us = collective_time_s(system, "all_reduce", tokens * 8192 * 2, 8) * 1e6
        row("TokenWeave", f"bf16 all-reduce of {tokens} x 8192 on 8x H100", f"{paper} us (PyTorch-dist)",
            f"{us:.0f} us ({us / paper - 1:+.0%})")
    for prompt in (1024, 8192):
        plain = estimate("llama-3.1-70b", "dgx-h100", batch=1, input_len=prompt, output_len=128, parallel=TP8)
        full = estimate("llama-3.1-70b", "dgx-h100", batch=1, input_len=prompt, output_len=128,
                        parallel=ParallelPlan(tp=8, overlap="full"))
        row("TokenWeave", f"Llama-3.3-70B shape, TP 8, DGX-H100, {prompt}-token prefill",
            "communication up to ~20%; overlap up to 1.28x latency",
            f"communication {plain.prefill.communication_s / plain.ttft_s:.0%} of the prefill; "
            f"full overlap {plain.ttft_s / full.ttft_s:.2f}x")


def easyspec() -> None:
    one = estimate("llama-3.1-8b", "dgx-h100", batch=1, input_len=512, output_len=64)
    eight = estimate("llama-3.1-8b", "dgx-h100", batch=1, input_len=512, output_len=64, parallel=TP8)
    row("EasySpec", "Llama-3-8B drafter under TP 8 vs one GPU, DGX-H100, batch 1",
        "TP drafting wastes GPUs; layer-parallel drafting up to 1.62x faster",
        f"TP 8 only {one.tpot_s / eight.tpot_s:.2f}x faster than one GPU; communication "
        f"{eight.decode.communication_s / eight.tpot_s:.0%} of its step")


def dovetail() -> None:
    cpu = host_device(load_system("workstation-4090"))
    plain = estimate("llama-2-7b", cpu, batch=1, input_len=128, output_len=128)
    for alpha in (0.6, 0.8):
        r = estimate("llama-2-7b", cpu, batch=1, input_len=128, output_len=128,
                     speculative=Speculation("tiny-dense-58m", 4, alpha, draft_hardware="rtx-4090"))
        row("Dovetail", f"Llama-2-7B verifying on a Ryzen 7950X, 58M draft on an RTX 4090, gamma 4, "
            f"alpha {alpha}", "1.79x-10.1x over CPU-only (13B, several devices); 2.77x (7B)",
            f"{plain.tpot_s / r.tpot_s:.2f}x ({1 / plain.tpot_s:.1f} -> {1 / r.tpot_s:.1f} tok/s)")


if __name__ == "__main__":
    print("| paper | setting | paper's figure | simulator |")
    print("|---|---|---|---|")
    for section in (deepspeed, splitwise, triforce, tokenweave, easyspec, dovetail):
        section()
