"""The cheapest way to serve Llama-2-70B on A100 or H100 nodes under latency SLOs, checked in the engine.

``plan_search`` costs every plan of a search space (tp and pp up to a node's 8 GPUs, batches 1 to
256, bf16/fp8/int8 weights, bf16/fp8 KV cache) at the workload's mean lengths, keeps those that
fit and meet TTFT <= 2 s and TPOT <= 50 ms in the estimate, ranks them by cost per million output
tokens, then serves the best ones in the serving engine under their share of the Azure
conversation trace (each replica gets every n-th request) and keeps the first three whose p90
TTFT and p90 gap between tokens meet the SLOs. Each plan says how many replicas carry the trace's
rate and what stops a bigger batch or fewer GPUs.

    python docs/examples/plan_search.py [--out DIR]

writes ``plan_search.png`` (cost per million output tokens of each plan the engine confirmed or
dropped, and of the best plan on the A100 node alone) and ``plan_search.json`` (the result, as
``infersim plan-search --json``) into DIR (default: a new temporary folder). The same search from
the command line:

    infersim plan-search --model llama-2-70b --hardware dgx-a100,dgx-h100 --slo-ttft 2 --slo-tpot 0.05 \\
        --workload ../shared/traces/azure-llm-inference-2023/splitwise_conv.csv
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from simulator.study.plan_search import describe, plan_search  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT.parent / "shared" / "traces" / "azure-llm-inference-2023" / "splitwise_conv.csv"
SLO = {"slo_ttft_s": 2.0, "slo_tpot_s": 0.05}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the chart and the JSON (default: a temp dir)")
    out = parser.parse_args(argv).out or Path(tempfile.mkdtemp(prefix="infersim-plan-search-"))
    out.mkdir(parents=True, exist_ok=True)

    # 1. The workload: the Azure conversation trace's arrivals and lengths when it is at hand
    #    (../shared/traces), else Poisson arrivals at its rate with its mean lengths.
    workload = {"workload": TRACE} if TRACE.is_file() else {"rate": 5.5, "input_len": 1155, "output_len": 211}
    if not TRACE.is_file():
        print(f"{TRACE} not found: Poisson arrivals at 5.5 requests/s, 1,155 in / 211 out instead")

    # 2. The search: the default space on both nodes, the cheapest three plans the engine confirms.
    result = plan_search("llama-2-70b", "dgx-a100,dgx-h100", **SLO, **workload, objective="cost", confirm=3)
    w = result.workload
    print(f"{w['source']}: {w['rate_requests_per_s']:.2f} requests/s, {w['input_len']} in / "
          f"{w['output_len']} out on average; {len(result.study)} configurations, "
          f"{result.engine_runs} serving runs")
    for k, (_, plan) in enumerate(result.plans.iterrows(), 1):
        print(f"{k}. {describe(plan)}: {plan.replicas} replicas = {plan.devices} GPUs, "
              f"${plan.cost_usd_per_million_tokens:.2f} per million tokens; estimate TTFT "
              f"{plan.ttft_s:.2f} s, TPOT {plan.tpot_s * 1e3:.1f} ms; engine p90 TTFT "
              f"{plan.engine_ttft_p90_s:.2f} s, TBT {plan.engine_tbt_p90_s * 1e3:.1f} ms")
        print(f"   bigger batch: {plan.binding}; fewer GPUs: {plan.binding_devices}")
    for item in result.dropped:
        print(f"dropped: {describe(item)}: {item['why']}")
    (out / "plan_search.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))

    # 3. The H100 node wins on cost; the best the A100 node can do, searched and confirmed alone.
    a100 = plan_search("llama-2-70b", "dgx-a100", **SLO, **workload, confirm=1).plans.iloc[0]
    print(f"best on dgx-a100: {describe(a100)}: {a100.replicas} replicas = {a100.devices} GPUs, "
          f"${a100.cost_usd_per_million_tokens:.2f} per million tokens "
          f"({a100.cost_usd_per_million_tokens / result.plans.cost_usd_per_million_tokens.iloc[0]:.1f}x)")

    # 4. One bar per plan tried, cheapest first: confirmed in blue, dropped by the engine in grey,
    #    the A100 node's best in orange.
    tried = [(describe(item), item["cost_usd_per_million_tokens"], "dropped") for item in result.dropped]
    tried += [(describe(plan), plan.cost_usd_per_million_tokens, "confirmed")
              for _, plan in result.plans.iterrows()]
    tried += [(describe(a100), a100.cost_usd_per_million_tokens, "best A100")]
    tried.sort(key=lambda entry: entry[1])
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(tried) + 1.5))
    colours = {"confirmed": "#4c72b0", "dropped": "#b0b0b0", "best A100": "#dd8452"}
    ax.barh(range(len(tried)), [cost for _, cost, _ in tried], color=[colours[s] for _, _, s in tried])
    ax.set_yticks(range(len(tried)), [f"{label} ({status})" for label, _, status in tried], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("cost (USD per million output tokens)")
    ax.set_title(f"llama-2-70b under TTFT <= {SLO['slo_ttft_s']:g} s, TPOT <= {SLO['slo_tpot_s'] * 1e3:g} ms")
    fig.tight_layout()
    fig.savefig(out / "plan_search.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'plan_search.png'} and {out / 'plan_search.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
