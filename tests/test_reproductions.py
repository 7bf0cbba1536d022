"""Seed papers' headline effects, reproduced in direction and rough size (docs/reproductions.md).

Each test sets up the paper's model and machine as far as its text allows and checks that the
simulator's effect points the same way and lands within a broad band of the paper's figure; the
figures themselves and the gaps are discussed in docs/reproductions.md.
"""

from pathlib import Path

import numpy as np
import pytest

from simulator import estimate
from simulator.cost.collectives import collective_time_s
from simulator.errors import DoesNotFitError
from simulator.specs.loader import load_model, load_system
from simulator.strategies.kv import KVPolicy
from simulator.strategies.offload import OffloadPlan, host_device
from simulator.strategies.parallel import ParallelPlan
from simulator.strategies.plan import search
from simulator.strategies.speculative import Speculation

T4 = "gcp-t4-flexgen"


@pytest.mark.parametrize("model, paper, compressed_paper",
                         [("opt-30b", 7.32, 8.38), ("opt-175b", 0.69, 1.12)])
def test_flexgen_throughput_on_one_t4(model, paper, compressed_paper):
    # FlexGen, Table 2 / README: prompt 512, 32 generated tokens, a 16 GB T4 with 208 GB DRAM and SSD.
    plain = search(model, T4, input_len=512, output_len=32, weight_dtype="fp16", max_batch=1024)
    packed = search(model, T4, input_len=512, output_len=32, weight_dtype="int4", kv_dtype="int4",
                    max_batch=1024, weight_dequant="separate", attention="naive")
    fused = search(model, T4, input_len=512, output_len=32, weight_dtype="int4", kv_dtype="int4",
                   max_batch=1024)
    assert paper / 3 < plain.result.throughput_tokens_per_s < paper * 3
    # FlexGen dequantizes group-wise int4 in separate GPU kernels: charged, they cost a little, and
    # the simulator stays 2.6-3.1x optimistic for reasons not in the paper (docs/reproductions.md).
    assert compressed_paper / 3 < packed.result.throughput_tokens_per_s < compressed_paper * 4
    assert packed.result.throughput_tokens_per_s < fused.result.throughput_tokens_per_s
    assert plain.plan.weights_off > 0 and packed.plan.weights_off > 0  # neither fits the T4
    assert packed.result.throughput_tokens_per_s > plain.result.throughput_tokens_per_s


def test_h2o_raises_offloaded_throughput():
    # H2O: 20% heavy hitters improve FlexGen's throughput by up to 3x on OPT-6.7B/30B (abstract).
    full = search("opt-30b", T4, input_len=512, output_len=32, weight_dtype="fp16", max_batch=1024)
    h2o = search("opt-30b", T4, input_len=512, output_len=32, weight_dtype="fp16", max_batch=1024,
                 kv_policy=KVPolicy("h2o", 0.2))
    gain = h2o.result.throughput_tokens_per_s / full.result.throughput_tokens_per_s
    assert 1.2 < gain < 6.0


def _largest_batch(**kw):
    batch = 1
    while True:
        try:
            estimate("llama-2-7b", "a100-80gb-sxm", batch=batch * 2, **kw)
        except DoesNotFitError:
            return batch
        batch *= 2


def test_kivi_allows_a_larger_batch_and_more_throughput():
    # KIVI: 2-bit KV lets Llama-2-7B use up to 4x larger batches, 2.35-3.47x throughput (abstract).
    shape = dict(input_len=1024, output_len=1024)
    fp16 = _largest_batch(**shape)
    kivi = _largest_batch(kv_dtype="int2", kv_residual=128, **shape)
    assert kivi >= 4 * fp16
    base = estimate("llama-2-7b", "a100-80gb-sxm", batch=fp16, **shape).throughput_tokens_per_s
    fast = estimate("llama-2-7b", "a100-80gb-sxm", batch=kivi, kv_dtype="int2", kv_residual=128,
                    **shape).throughput_tokens_per_s
    assert 1.5 < fast / base < 8.0


def test_layer_split_on_a_gpu_beats_moving_layers_at_batch_one():
    # llama.cpp-style partial offload: with half of Llama-2-13B's layers on the host, running
    # them on the CPU beats streaming them over PCIe at batch 1, the reason -ngl computes there.
    from simulator.specs.loader import load_model

    model = load_model("llama-2-13b")
    hybrid = estimate(model, "workstation-4090", offload=OffloadPlan.build(model, layers_on_device=20,
                                                                           host_compute=True))
    moved = estimate(model, "workstation-4090", offload=OffloadPlan.build(model, layers_on_device=20))
    assert hybrid.tpot_s < moved.tpot_s


# --- issue 5: parallelism, disaggregation and speculation ------------------------------------

FP16 = {"weight_dtype": "fp16", "act_dtype": "fp16"}


@pytest.mark.parametrize("batch, paper_ms", [(1, 44.02), (8, 5.70), (32, 1.68), (128, 0.69)])
def test_deepspeed_inference_bloom_176b_tp8(batch, paper_ms):
    # DeepSpeed-Inference fp16, TP 8 on 8x A100-80GB, 100 new tokens after a few-token prompt;
    # walltime / (batch x new tokens) (Hugging Face, "Incredibly Fast BLOOM Inference", 2022).
    result = estimate("bloom-176b", "dgx-a100", batch=batch, input_len=8, output_len=100,
                      parallel=ParallelPlan(tp=8), **FP16)
    ours_ms = result.e2e_s / (batch * 100) * 1e3
    assert 0.6 * paper_ms < ours_ms < 1.4 * paper_ms


@pytest.mark.parametrize("prompt, output, paper", [
    (1500, 13, {"dgx-a100": (185, 52), "dgx-h100": (95, 31)}),    # coding, P50
    (1020, 129, {"dgx-a100": (155, 40), "dgx-h100": (84, 28)}),   # conversation, P50
])
def test_splitwise_phase_split_a100_vs_h100(prompt, output, paper):
    # Splitwise Table IV: Llama-70B on vLLM, TP 8, no batching.
    ours = {hw: estimate("llama-2-70b", hw, batch=1, input_len=prompt, output_len=output,
                         parallel=ParallelPlan(tp=8), **FP16) for hw in paper}
    for hw, (ttft_ms, tbt_ms) in paper.items():
        assert 0.5 * ttft_ms < ours[hw].ttft_s * 1e3 < 1.5 * ttft_ms
        # vLLM's per-step CPU work at batch 1 is not modelled: TBT is optimistic, never pessimistic.
        assert 0.4 * tbt_ms < ours[hw].tpot_s * 1e3 < 1.0 * tbt_ms
    # Insight VII: the H100 helps the prompt phase more than the token phase.
    ttft_ratio = ours["dgx-h100"].ttft_s / ours["dgx-a100"].ttft_s
    tbt_ratio = ours["dgx-h100"].tpot_s / ours["dgx-a100"].tpot_s
    assert ttft_ratio < tbt_ratio < 1.0


def test_splitwise_kv_transfer_hides_under_the_prompt():
    # Splitwise §VI-A: the per-layer KV transfer costs under 7% of the prompt computation.
    result = estimate("llama-2-70b", "dgx-a100", prefill_hardware="dgx-a100", decode_hardware="dgx-a100",
                      batch=1, input_len=1500, output_len=13, parallel=ParallelPlan(tp=8), **FP16)
    kv = result.strategy["disaggregation"]["kv_transfer"]
    assert kv["time_s"] < 0.07 * result.ttft_s
    assert kv["exposed_s"] < kv["time_s"]


def test_triforce_self_speculation_at_128k():
    # TriForce: Llama2-7B-128K on one A100, 124,928-token prompt, 4K retrieval cache, gamma 6:
    # up to 2.31x (abstract); acceptance above 0.9 (text).
    model = load_model("llama-2-7b").model_copy(update={"max_position_embeddings": 131072})
    shape = dict(batch=1, input_len=124928, output_len=256, check_memory=False)
    plain = estimate(model, "a100-80gb-sxm", **shape)
    triforce = estimate(model, "a100-80gb-sxm", speculative=Speculation("self", 6, 0.9, draft_kv_budget=4096),
                        **shape)
    speedup = plain.tpot_s / triforce.tpot_s
    assert 1.5 < speedup < 3.5


@pytest.mark.parametrize("tokens, paper_us", [(1024, 137.2), (8192, 646.2)])
def test_tokenweave_all_reduce_on_dgx_h100(tokens, paper_us):
    # TokenWeave artifact, figure 6: bf16 all-reduce of tokens x 8192 on 8x H100 (PyTorch-dist).
    ours = collective_time_s(load_system("dgx-h100"), "all_reduce", tokens * 8192 * 2, 8) * 1e6
    assert 0.6 * paper_us < ours < 1.4 * paper_us


def test_tokenweave_communication_share_and_overlap():
    # TokenWeave: all-reduce costs up to ~20% even over NVLink; overlap gives up to 1.28x latency.
    plain = estimate("llama-3.1-70b", "dgx-h100", batch=1, input_len=1024, output_len=128,
                     parallel=ParallelPlan(tp=8))
    hidden = estimate("llama-3.1-70b", "dgx-h100", batch=1, input_len=1024, output_len=128,
                      parallel=ParallelPlan(tp=8, overlap="full"))
    share = plain.prefill.communication_s / plain.ttft_s
    assert 0.1 < share < 0.4
    assert 1.1 < plain.ttft_s / hidden.ttft_s < 1.6


def test_easyspec_a_tensor_parallel_drafter_scales_poorly():
    # EasySpec: a small drafter under the target's TP degree wastes the GPUs; layer-parallel
    # drafting speeds the drafting stage up to 1.62x. Ours: TP 8 buys the 8B drafter little.
    one = estimate("llama-3.1-8b", "dgx-h100", batch=1, input_len=512, output_len=64)
    eight = estimate("llama-3.1-8b", "dgx-h100", batch=1, input_len=512, output_len=64,
                     parallel=ParallelPlan(tp=8))
    assert one.tpot_s / eight.tpot_s < 2.0
    assert eight.decode.communication_s > 0.3 * eight.tpot_s


@pytest.mark.parametrize("alpha", [0.6, 0.8])
def test_dovetail_gpu_draft_cpu_verify(alpha):
    # Dovetail: the draft on the GPU, the target verifying on the CPU; 1.79x-10.1x over CPU-only
    # decoding (abstract). Verifying gamma + 1 tokens costs the CPU about one token's weight reads.
    cpu = host_device(load_system("workstation-4090"))
    plain = estimate("llama-2-7b", cpu, batch=1, input_len=128, output_len=128)
    spec = estimate("llama-2-7b", cpu, batch=1, input_len=128, output_len=128,
                    speculative=Speculation("tiny-dense-58m", 4, alpha, draft_hardware="rtx-4090"))
    assert 1.79 < plain.tpot_s / spec.tpot_s < 10.1
    info = spec.strategy["speculative"]
    assert info["verify_step_s"] < 1.2 * plain.tpot_s


# --- issue 4: LLM in a flash, XQuant, TPI-LLM (docs/reproduce_memory.py) ------------------------

def test_llm_in_a_flash_load_per_token():
    from docs.reproduce_memory import flash_load_ms

    assert 0.6 * 125 < flash_load_ms() < 1.4 * 125  # paper: 125 ms per token on an M1 Max


@pytest.mark.parametrize("dtype, paper", [("fp16", 2.0), ("int4", 7.7)])
def test_xquant_memory_saving(dtype, paper):
    from docs.reproduce_memory import xquant_ratio

    assert xquant_ratio(dtype) == pytest.approx(paper, rel=0.05)


def test_tpi_llm_memory_per_device():
    from docs.reproduce_memory import tpi_llm_gb

    assert 0.8 * 3.1 < tpi_llm_gb() <= 3.1


@pytest.mark.parametrize("path", sorted(str(p) for p in
                                        __import__("pathlib").Path("workloads/scenarios").rglob("*.yaml")))
def test_every_shipped_scenario_runs(path):
    from simulator.scenario import load_scenario, run_scenario, serve_scenario

    if load_scenario(path).serving is not None:
        records, summary = serve_scenario(path)
        assert summary["completed"] == len(records.requests) > 0
        return
    result = run_scenario(path)
    assert result.throughput_tokens_per_s > 0 and result.memory.total > 0


def test_reproduction_scenarios_point_the_papers_way():
    from simulator.scenario import run_scenario

    folder = "workloads/scenarios/reproductions/"
    flexgen = run_scenario(folder + "flexgen-opt-30b-t4.yaml")
    h2o = run_scenario(folder + "h2o-opt-30b-t4.yaml")
    assert 7.32 / 3 < flexgen.throughput_tokens_per_s < 7.32 * 3
    assert 1.2 < h2o.throughput_tokens_per_s / flexgen.throughput_tokens_per_s < 6.0
    kivi = run_scenario(folder + "kivi-llama-2-7b-a100.yaml")
    assert kivi.memory.total <= kivi.memory.capacity  # batch 128 fits with 2-bit KV
    xquant = run_scenario(folder + "xquant-llama-2-7b-a100.yaml")
    assert xquant.strategy["kv_store"].startswith("x")
    flash = run_scenario(folder + "llm-in-a-flash-opt-6.7b.yaml")
    assert flash.strategy["flash"]["reads_per_step"]["decode"]["read_size"] == pytest.approx(16384)
    hybrimoe = run_scenario(folder + "hybrimoe-mixtral-a6000.yaml")
    assert hybrimoe.strategy["offload"]["experts"]["misses_on_host"]
    expertflow = run_scenario(folder + "expertflow-deepseek-moe-a40.yaml")
    assert expertflow.memory.tiers["device"].used < 0.25 * expertflow.memory.total  # experts on the host


# --- issue 4: MoE expert offloading, HybriMoE and ExpertFlow (docs/reproduce_moe.py) -----------

@pytest.mark.parametrize("model", ["mixtral-8x7b", "deepseek-v2-lite"])
def test_hybrimoe_dynamic_cpu_gpu_scheduling_beats_a_static_mapping(model):
    # HybriMoE: 1.33x prefill and 1.70x decode over kTransformers on average (A6000, 10 Xeon cores,
    # cache ratios 25/50/75%, prompts of about 32-1024 tokens).
    from docs.reproduce_moe import hybrimoe_speedups

    s = hybrimoe_speedups(model)
    assert s["prefill_min"] >= 1.0 and 1.33 / 2 < s["prefill"] < 1.33 * 2
    # Decode: the simulator has the overlap of CPU misses with GPU hits, not HybriMoE's score-aware
    # cache nor a split of the misses between the CPU and the link, so it stays well short of 1.70x.
    assert s["decode_min"] >= 1.0 and 1.0 < s["decode"] < 1.70


@pytest.mark.parametrize("model, all_gpu_gb, expertflow_gb",
                         [("deepseek-moe-16b", 31.35, 6.38), ("qwen1.5-moe-a2.7b", 35.21, 6.52)])
def test_expertflow_experts_on_the_host_cut_gpu_memory(model, all_gpu_gb, expertflow_gb):
    # ExpertFlow on one A40: GPU memory all-in-GPU -> with its predictive expert cache (paper's text
    # as quoted by reading notes; the abstract's "up to 93.72%" is a Switch model, not set up here).
    from docs.reproduce_moe import expertflow_memory_gb

    whole, fits, floor = expertflow_memory_gb(model)
    assert fits and 0.7 * all_gpu_gb < whole < 1.3 * all_gpu_gb
    # With no expert cached the GPU's memory is a floor the paper's cache sits above, not far.
    assert 0.5 * expertflow_gb < floor <= expertflow_gb
    assert 1.0 - floor / whole > 0.7


def test_expertflow_mixtral_needs_the_host_on_an_a40():
    # ExpertFlow: Mixtral-8x7B all-in-GPU runs out of memory on the A40; ExpertFlow runs in 15.99 GB.
    from docs.reproduce_moe import expertflow_memory_gb

    whole, fits, floor = expertflow_memory_gb("mixtral-8x7b")
    assert not fits and floor < 15.99


# --- issue 8: serving-level results (docs/reproduce_serving.py) -------------------------------

SHARED_TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
needs_traces = pytest.mark.skipif(not SHARED_TRACES.is_dir(),
                                  reason="the shared traces are not beside the repo (../shared/traces)")


@needs_traces
def test_splitwise_split_machines_serve_more_per_kw_and_per_dollar():
    # Splitwise: phase-split clusters deliver more throughput at the same power and cost (2.35x) or
    # more at lower cost (1.4x at 20% less; abstract). Offered the same load per kW (coding trace),
    # two mixed DGX-A100s miss the SLOs; the same machines split (AA) and H100 prompt machines with an
    # A100 token machine (HA) meet them, HA also at the same load per dollar.
    from docs import reproduce_serving as rs

    designs = {d.name: d for d in rs.splitwise_designs("code")}
    per_kw, per_usd, seconds = 0.45, 0.09, 12.0  # req/s per kW of GPU nameplate and per $/h

    def meets(name, rate):
        return rs.meets_splitwise_slo(rs.splitwise_serve(designs[name], "code", rate, seconds))

    assert not meets("Baseline-A100", per_kw * designs["Baseline-A100"].power_kw)
    assert meets("Splitwise-AA", per_kw * designs["Splitwise-AA"].power_kw)
    assert not meets("Baseline-A100", per_usd * designs["Baseline-A100"].usd_per_hour)
    assert meets("Splitwise-HA", per_usd * designs["Splitwise-HA"].usd_per_hour)


@needs_traces
def test_polca_capped_servers_fit_more_in_a_budget_at_a_small_latency_cost():
    # POLCA: 30% more servers in the same power budget with minimal performance loss (abstract).
    # Inference draws well below nameplate; a cap at that draw makes the extra servers safe and
    # slows compute-bound prefill a little, memory-bound decode hardly at all.
    from docs import reproduce_serving as rs

    base, capped = rs.polca_run(None, requests=60), rs.polca_run(200.0, requests=60)
    nameplate = base["budget"]["servers_at_nameplate"]
    assert 1.1 * nameplate < base["budget"]["servers_at_observed_peak"] < 1.8 * nameplate
    assert capped["budget"]["servers_capped"] >= 1.2 * nameplate
    b, c = base["summary"], capped["summary"]
    assert b["ttft_s"]["p50"] < c["ttft_s"]["p50"] < 1.5 * b["ttft_s"]["p50"]
    assert c["tbt_s"]["p50"] == pytest.approx(b["tbt_s"]["p50"], rel=0.05)
    assert c["power_w"]["peak"] < b["power_w"]["peak"]


@needs_traces
def test_sarathi_chunked_prefill_cuts_the_tbt_tail_at_the_same_throughput():
    # Sarathi-Serve: chunked prefills with stall-free batching raise Mistral-7B's serving capacity
    # on one A100 2.6x under a P99 TBT SLO (abstract): a whole prompt no longer stalls the decodes.
    from docs import reproduce_serving as rs

    vllm = rs.sarathi_serve(rs.VLLM, 1.5, requests=100)
    chunked = rs.sarathi_serve(rs.SARATHI["strict"], 1.5, requests=100)
    assert np.percentile(chunked.token_gaps_s, 99) < 0.5 * np.percentile(vllm.token_gaps_s, 99)
    assert not rs.sarathi_meets(vllm, rs.SARATHI_TBT_SLO_S["strict"])
    assert rs.sarathi_meets(chunked, rs.SARATHI_TBT_SLO_S["strict"])
    tokens = [r.summary()["throughput_tokens_per_s"] for r in (vllm, chunked)]
    assert tokens[1] == pytest.approx(tokens[0], rel=0.05)


def test_moe_offload_plan_stays_under_its_hardware_bound():
    # MoE-Lens: an offloaded MoE's throughput is bounded by PCIe, CPU memory and GPU compute; the
    # simulator's FlexGen-style plan (KV through the GPU) is link-bound far below that bound.
    from docs import reproduce_serving as rs

    bound, planned = rs.moe_bound(), rs.moe_planned()
    assert bound["bound"] == "PCIe (weights)"
    assert "host-to-device" in planned["binding"]
    assert planned["decode_tokens_per_s"] < 0.2 * bound["tokens_per_s"]


# --- issue 9: test-time compute (docs/reproduce_ttc.py) -----------------------------------------

def test_kinetics_attention_share_grows_with_output_length():
    # Kinetics: in long generations attention (KV traffic), not parameters, dominates the cost, the
    # more so the smaller the model. Ours, per-op on one B200: at a fixed batch the attention share
    # grows with the output for both models, the 8B's above the 70B's; at the largest batch that
    # fits, memory capacity caps it (the 70B's KV gets what its weights leave), far below Kinetics'
    # formula, which charges no weight reads.
    from docs.reproduce_ttc import LARGE, SMALL, kinetics_rows

    frame = kinetics_rows()
    for model in (SMALL, LARGE):
        part = frame[frame.model == model].sort_values("output_len")
        assert np.all(np.diff(part.batch_1) > 0) and np.all(np.diff(part.kinetics) > 0)
        assert part.batch_1.iloc[-1] > 2 * part.batch_1.iloc[0]
        assert (part.kinetics > part.at_max_batch).all() and (part.at_max_batch > part.batch_1).all()
    small, large = (frame[frame.model == m].set_index("output_len") for m in (SMALL, LARGE))
    assert (small.batch_1 > large.batch_1).all() and (small.kinetics > large.kinetics).all()
    assert (small.at_max_batch > 0.6).all() and (large.at_max_batch < 0.2).all()
    assert small.kinetics.iloc[-1] > 0.95  # Kinetics: attention dominates at 32k tokens


def test_iso_cost_the_small_models_advantage_shrinks_with_longer_outputs():
    # At equal samples and output length the 70B costs more per prompt than the 8B, by less than
    # its 8.8x parameters (its KV per token is only 2.5x); the ratio falls as outputs grow (KV
    # traffic and capacity, not weights, set the cost), so a fixed budget buys the 8B fewer extra
    # samples per 70B sample at 16k tokens than at 2k.
    from docs.reproduce_ttc import LARGE, SMALL, affordable, cost_ratio, iso_cost_frame

    best = iso_cost_frame(samples=(1, 4, 16))
    ratio = cost_ratio(best)
    params = load_model(LARGE).params() / load_model(SMALL).params()
    assert ((ratio > 1.0) & (ratio < params)).all().all()
    assert (ratio[16384] < ratio[2048] - 0.8).all()
    assert np.all(np.diff(ratio.loc[1].to_numpy()) < 0)  # one sample: falls at every doubling
    counts = affordable(best, 0.05, 8192)
    assert counts[SMALL] >= 4 * max(counts[LARGE], 1) and counts[LARGE] >= 1


def test_genz_platform_requirements_for_llama3_70b():
    # GenZ, Sec. 7 (its notebook's tables): LLaMA3-70B at 1 byte per value needs 6.6-7.2 TB/s to
    # decode at 10 ms per token (batch 1, 2-4 beams). Our bytes per step over the target agree
    # within 10% (we add the bf16 LM head and read the mean, not the final, context); our H100
    # cannot reach 10 ms at any bandwidth (small-row GEMMs and kernel floors), and holding each
    # prompt once (beams share it) needs less memory than GenZ's per-beam cache at long prompts.
    from docs.reproduce_ttc import genz_rows

    frame = genz_rows().set_index("use_case")
    assert ((frame.ideal_bandwidth / frame.genz_bandwidth_si - 1).abs() < 0.10).all()
    assert (frame.ideal_bandwidth >= frame.genz_bandwidth_si).all()
    assert frame.loc[["QA", "Chat bots", "QA + RAG"], "bandwidth_on_device"].isna().all()
    assert (frame.loc[["Summarization", "Code generation"], "bandwidth_on_device"]
            > frame.loc[["Summarization", "Code generation"], "ideal_bandwidth"]).all()
    assert ((frame.ideal_pflops / frame.genz_pflops - 1).abs() < 0.15).all()
    assert (frame.ideal_pflops <= frame.genz_pflops * 1.001).all()  # causal attention: half the pairs
    long = frame.loc[["Summarization", "Code generation"]]
    assert (long.memory_gb < long.genz_memory_gb).all()
