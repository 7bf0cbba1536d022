"""Parallel plans, collectives, disaggregation and speculation: properties and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.cli import main
from simulator.cost.collectives import collective_time_s
from simulator.errors import DoesNotFitError, InferSimError
from simulator.estimate import estimate
from simulator.specs.loader import load_system
from simulator.strategies.parallel import ParallelPlan, balls_in_bins_imbalance, workers_on_host
from simulator.strategies.speculative import Speculation

FAST = {"decode_samples": 4}


def _with_link_rate(system_name: str, factor: float):
    system = load_system(system_name)
    intra = system.links.intra_node
    intra = intra.model_copy(update={"bandwidth": intra.bandwidth * factor})
    return system.model_copy(update={"links": system.links.model_copy(update={"intra_node": intra})})


# --- properties -----------------------------------------------------------------------

@settings(max_examples=15, deadline=None)
@given(st.sampled_from([(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (1, 4)]), st.sampled_from([1, 2, 4]))
def test_more_devices_never_raise_weight_memory_per_device(degrees, batch):
    tp, pp = degrees
    base = estimate("llama-2-13b", "dgx-h100", batch=batch, input_len=256, output_len=8,
                    parallel=ParallelPlan(tp=tp, pp=pp, micro_batches=1), **FAST)
    for more in (ParallelPlan(tp=2 * tp, pp=pp, micro_batches=1),
                 ParallelPlan(tp=tp, pp=2 * pp, micro_batches=1)):
        other = estimate("llama-2-13b", "dgx-h100", batch=batch, input_len=256, output_len=8,
                         parallel=more, **FAST)
        assert other.memory.weights <= base.memory.weights * (1 + 1e-9)


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.floats(1.1, 10.0), st.sampled_from([1, 16, 128]),
       st.booleans())
def test_a_faster_link_never_slows_a_step(tp, factor, batch, sequence_parallel):
    plan = ParallelPlan(tp=tp, sequence_parallel=sequence_parallel)
    slow = estimate("llama-2-13b", "dgx-a100", batch=batch, input_len=512, output_len=16, parallel=plan,
                    **FAST)
    fast = estimate("llama-2-13b", _with_link_rate("dgx-a100", factor), batch=batch, input_len=512,
                    output_len=16, parallel=plan, **FAST)
    assert fast.ttft_s <= slow.ttft_s * (1 + 1e-12)
    assert fast.tpot_s <= slow.tpot_s * (1 + 1e-12)


@settings(max_examples=10, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_more_overlap_never_slower(a, b):
    low, high = sorted((a, b))
    run = lambda o: estimate("llama-2-70b", "dgx-h100", batch=8, input_len=512, output_len=16,  # noqa: E731
                             parallel=ParallelPlan(tp=8, overlap=o), **FAST)
    assert run(high).tpot_s <= run(low).tpot_s * (1 + 1e-12)
    assert run(high).ttft_s <= run(low).ttft_s * (1 + 1e-12)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 8), st.sampled_from([1, 8, 32]))
def test_speculation_alpha_zero_loses_and_alpha_one_approaches_gamma_plus_one(gamma, batch):
    plain = estimate("llama-2-7b", "a100-80gb-sxm", batch=batch, input_len=256, output_len=32, **FAST)
    zero = estimate("llama-2-7b", "a100-80gb-sxm", batch=batch, input_len=256, output_len=32,
                    speculative=Speculation("tiny-dense-58m", gamma, 0.0), **FAST)
    assert zero.tpot_s > plain.tpot_s
    assert zero.strategy["speculative"]["expected_tokens_per_round"] == pytest.approx(1.0)
    near = Speculation("tiny-dense-58m", gamma, 0.999).expected_tokens()
    assert gamma + 1 - 0.05 * gamma <= near <= gamma + 1


def test_balls_in_bins_imbalance_is_between_one_and_ep_and_falls_with_load():
    values = [balls_in_bins_imbalance(rows, 8) for rows in (0.5, 4, 64, 4096)]
    assert all(1.0 <= v <= 8.0 for v in values)
    assert values == sorted(values, reverse=True)
    assert balls_in_bins_imbalance(10.0, 1) == 1.0


# --- plans and their numbers ---------------------------------------------------------------

def test_a_plan_of_one_device_equals_no_plan():
    plain = estimate("llama-2-7b", "dgx-h100", batch=4, input_len=256, output_len=16, **FAST)
    one = estimate("llama-2-7b", "dgx-h100", batch=4, input_len=256, output_len=16,
                   parallel=ParallelPlan(), **FAST)
    assert one.ttft_s == plain.ttft_s and one.tpot_s == plain.tpot_s


def test_tensor_parallel_reports_two_all_reduces_per_layer():
    result = estimate("llama-2-70b", "dgx-h100", batch=4, input_len=256, output_len=16,
                      parallel=ParallelPlan(tp=8), **FAST)
    [reduce] = result.decode.collectives
    assert reduce["collective"] == "all_reduce" and reduce["count"] == 2 * 80
    assert reduce["bytes"] == 4 * 8192 * 2  # batch x hidden x bf16
    out = result.to_dict(ops=False)["decode"]
    assert out["communication_s"] == pytest.approx(reduce["total_s"])
    assert 0 < out["exposed_communication_s"] <= out["communication_s"] + 1e-12
    assert result.memory.weights < 70e9 * 2 / 8 * 1.1


def test_data_parallel_multiplies_throughput_at_the_same_latency():
    one = estimate("llama-2-7b", "dgx-h100", batch=8, input_len=256, output_len=16, **FAST)
    eight = estimate("llama-2-7b", "dgx-h100", batch=64, input_len=256, output_len=16,
                     parallel=ParallelPlan(dp=8), **FAST)
    assert eight.tpot_s == pytest.approx(one.tpot_s)
    assert eight.throughput_tokens_per_s == pytest.approx(8 * one.throughput_tokens_per_s)


def test_pipeline_micro_batches_shrink_the_prefill_bubble():
    run = lambda m: estimate("llama-2-70b", "dgx-h100", batch=8, input_len=1024, output_len=8,  # noqa: E731
                             parallel=ParallelPlan(tp=4, pp=2, micro_batches=m), **FAST)
    one, four = run(1), run(4)
    assert four.ttft_s < one.ttft_s
    sends = [c for c in four.prefill.collectives if c["name"] == "pp_send"]
    assert sends and sends[0]["count"] == 4  # (pp - 1) hops x 4 micro-batches


def test_expert_parallel_all_to_all_and_memory():
    result = estimate("mixtral-8x7b", "dgx-h100", batch=64, input_len=256, output_len=8,
                      parallel=ParallelPlan(ep=8), **FAST)
    names = {c["name"] for c in result.decode.collectives}
    assert names == {"ep_dispatch", "ep_combine"}
    two = estimate("mixtral-8x7b", "dgx-h100", batch=64, input_len=256, output_len=8,
                   parallel=ParallelPlan(ep=2), **FAST)
    assert result.memory.weights < two.memory.weights
    skewed = estimate("mixtral-8x7b", "dgx-h100", batch=64, input_len=256, output_len=8,
                      parallel=ParallelPlan(ep=8, expert_imbalance=4.0), **FAST)
    assert skewed.tpot_s > result.tpot_s


@pytest.mark.parametrize("model, plan, hardware, message", [
    ("llama-2-70b", ParallelPlan(tp=3), "dgx-h100", "does not divide"),
    ("llama-2-7b", ParallelPlan(ep=2), "dgx-h100", "dense"),
    ("mixtral-8x7b", ParallelPlan(ep=3), "dgx-h100", "does not divide"),
    ("tiny-dense-58m", ParallelPlan(pp=64), "dgx-h100", "exceeds"),
    ("llama-2-7b", ParallelPlan(tp=2), "a100-80gb-sxm", "has 1"),
    ("llama-2-7b", ParallelPlan(dp=3), "dgx-h100", "does not split"),
])
def test_impossible_degrees_are_clear_errors(model, plan, hardware, message):
    with pytest.raises(InferSimError, match=message):
        estimate(model, hardware, batch=4, input_len=128, output_len=4, parallel=plan)


def test_bad_plan_values_are_clear_errors():
    with pytest.raises(InferSimError, match="overlap"):
        ParallelPlan(overlap="most")
    with pytest.raises(InferSimError, match="--tp"):
        ParallelPlan(tp=0)
    with pytest.raises(InferSimError, match="multiple of tp"):
        ParallelPlan(tp=4, ep=2)


def test_does_not_fit_per_device_names_the_plan():
    with pytest.raises(DoesNotFitError, match="per device.*Raise --tp"):
        estimate("llama-3.1-405b", "dgx-h100", batch=1, input_len=128, output_len=4,
                 parallel=ParallelPlan(tp=2))


# --- collectives ----------------------------------------------------------------------

def test_collective_costs_grow_with_size_and_split_ring_all_reduce():
    system = load_system("dgx-a100")
    sizes = np.array([1e3, 1e6, 1e8])
    for kind in ("all_reduce", "all_to_all", "reduce_scatter", "all_gather", "send_recv"):
        times = collective_time_s(system, kind, sizes, 8)
        assert np.all(np.diff(times) > 0), kind
    big = 1e9
    halves = 2 * collective_time_s(system, "reduce_scatter", big, 8)
    assert halves == pytest.approx(collective_time_s(system, "all_reduce", big, 8), rel=0.05)
    with pytest.raises(InferSimError, match="unknown collective"):
        collective_time_s(system, "broadcast", big, 8)


# --- a CPU host as worker processes ----------------------------------------------------------

def test_a_calibrated_host_splits_into_workers():
    system = load_system("hardware_specs/local/epyc-2core.yaml")
    two = workers_on_host(system, 2)
    assert two.devices_per_node == 2 and two.links.intra_node.name == "shared memory"
    assert two.device.compute["fp32"] == pytest.approx(system.device.compute["fp32"] / 2)
    with pytest.raises(InferSimError, match="cores"):
        workers_on_host(system, 3)
    result = estimate("tiny-dense-58m", system, batch=2, input_len=64, output_len=4, weight_dtype="fp32",
                      act_dtype="fp32", parallel=ParallelPlan(tp=2))
    assert result.decode.communication_s > 0


# --- disaggregation ------------------------------------------------------------------------

def test_disaggregation_costs_each_pool_and_the_transfer():
    kw = dict(batch=8, input_len=1024, output_len=32, parallel=ParallelPlan(tp=8), **FAST)
    split = estimate("llama-2-70b", "dgx-h100", prefill_hardware="dgx-h100", decode_hardware="dgx-a100", **kw)
    h100 = estimate("llama-2-70b", "dgx-h100", **kw)
    a100 = estimate("llama-2-70b", "dgx-a100", **kw)
    assert split.ttft_s == pytest.approx(h100.ttft_s)
    assert split.tpot_s == pytest.approx(a100.tpot_s)
    info = split.strategy["disaggregation"]
    assert info["kv_transfer"]["bytes"] == pytest.approx(8 * 1024 * 80 * 2 * 8 * 128 * 2)
    assert split.e2e_s == pytest.approx(split.ttft_s + split.kv_transfer_s + 31 * split.tpot_s)
    slow = estimate("llama-2-70b", "dgx-h100", prefill_hardware="dgx-h100", decode_hardware="dgx-a100",
                    kv_link="1 GB/s", **kw)
    assert slow.kv_transfer_s > split.kv_transfer_s
    with pytest.raises(InferSimError, match="kv-link"):
        estimate("llama-2-70b", "dgx-h100", prefill_hardware="dgx-h100", kv_link="fast", **kw)
    with pytest.raises(InferSimError, match="needs --prefill-hardware"):
        estimate("llama-2-7b", "dgx-h100", kv_link="inter_node")


def test_disaggregation_errors_name_the_pool():
    with pytest.raises(DoesNotFitError, match="^prefill pool"):
        estimate("llama-2-70b", "dgx-h100", decode_hardware="dgx-h100", prefill_hardware="a100-80gb-sxm",
                 batch=1, input_len=128, output_len=8)
    with pytest.raises(InferSimError, match="^decode pool.*has 1"):
        estimate("llama-2-70b", "dgx-h100", decode_hardware="a100-80gb-sxm", batch=1, input_len=128,
                 output_len=8, prefill_hardware="dgx-h100", parallel=ParallelPlan(tp=8))


# --- CLI and scenario ---------------------------------------------------------------------------

def test_cli_parallel_flags_reach_the_json(capsys):
    assert main(["estimate", "--model", "llama-2-70b", "--hardware", "dgx-h100", "--tp", "4", "--pp", "2",
                 "--batch", "8", "--output-len", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strategy"]["parallel"]["devices"] == 8
    assert {c["name"] for c in out["decode"]["collectives"]} == {"tp_all_reduce", "pp_send"}
    assert main(["estimate", "--model", "llama-2-70b", "--hardware", "dgx-h100", "--tp", "3"]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_shipped_parallel_scenarios_run():
    from simulator.scenario import run_scenario

    split = run_scenario("workloads/scenarios/llama-2-70b-splitwise.yaml")
    assert split.kv_transfer_s > 0 and "->" in split.hardware
    moe = run_scenario("workloads/scenarios/mixtral-dgx-h100-ep.yaml")
    assert moe.strategy["parallel"]["ep"] == 8


# --- measured collectives, workers and pipeline schedules --------------------------------------

def test_a_measured_collective_replaces_the_link_model_for_its_group_size():
    from simulator.specs.hardware import MeasuredCollective

    system = load_system("dgx-h100")
    measured = system.collectives.model_copy(update={"measured": {
        "all_reduce": MeasuredCollective(workers=2, latency=1e-3, bandwidth=1e9)}})
    timed = system.model_copy(update={"collectives": measured})
    assert collective_time_s(timed, "all_reduce", 1e6, 2) == pytest.approx(1e-3 + 1e-3)
    assert collective_time_s(timed, "all_reduce", 1e6, 4) == collective_time_s(system, "all_reduce", 1e6, 4)


def test_workers_take_the_gemm_fit_of_their_concurrency():
    system = load_system("hardware_specs/local/epyc-2core.yaml")
    fits = system.device.efficiency.fit["shared_memory"].get("worker_gemms")
    if not fits:
        pytest.skip("this host file has no worker GEMM fit")
    alone = workers_on_host(system, 2, concurrent=1).device.efficiency.kernels["gemv"].bandwidth
    both = workers_on_host(system, 2, concurrent=2).device.efficiency.kernels["gemv"].bandwidth
    assert alone == pytest.approx(fits["1"]["parameters"]["gemv_bandwidth"])
    assert both == pytest.approx(fits["2"]["parameters"]["gemv_bandwidth"])
    worker = workers_on_host(system, 2).device
    assert worker.compute_units == 1
    assert worker.efficiency.kernels["norm"] == system.device.efficiency.kernels["norm"]


def test_gpipe_drains_the_pipeline_every_decode_step():
    run = lambda schedule: estimate("llama-2-70b", "dgx-h100", batch=8, input_len=256,  # noqa: E731
                                    output_len=8, parallel=ParallelPlan(tp=4, pp=2, micro_batches=4,
                                                                        schedule=schedule), **FAST)
    interleaved, gpipe = run("interleaved"), run("gpipe")
    assert gpipe.tpot_s > interleaved.tpot_s
    assert gpipe.ttft_s == pytest.approx(interleaved.ttft_s)
    with pytest.raises(InferSimError, match="pp-schedule"):
        ParallelPlan(pp=2, schedule="zigzag")


def test_pipeline_of_one_micro_batch_costs_the_whole_model_once():
    # One micro-batch through two stages: every layer once, plus the sends; no faster than one device.
    one = estimate("llama-2-13b", "dgx-h100", batch=4, input_len=512, output_len=8, **FAST)
    two = estimate("llama-2-13b", "dgx-h100", batch=4, input_len=512, output_len=8,
                   parallel=ParallelPlan(pp=2, micro_batches=1), **FAST)
    assert two.ttft_s >= one.ttft_s * 0.99
    assert two.ttft_s < one.ttft_s * 1.1


def test_recorded_calibration_points_rebuild_as_ops():
    import yaml

    from simulator.calibrate.host import points_from_raw

    document = yaml.safe_load(open("hardware_specs/local/epyc-2core.yaml"))
    raw = document["efficiency"]["fit"]["points"]
    points = points_from_raw(raw)
    assert len(points.ops) == len(raw)
    assert [r["op"] for r in points.raw] == [r["op"] for r in raw]
    assert points.measured_s == [r["seconds"] for r in raw]


def test_a_kernel_kind_fitted_alone_recovers_its_bandwidth():
    import numpy as np

    from simulator.calibrate.host import DEQUANTIZE_KINDS, _dequantize_ops
    from simulator.calibrate.operators import fit_kernel_kinds
    from simulator.cost.roofline import cost_op
    from simulator.specs.hardware import KernelEfficiency

    host = load_system("hardware_specs/local/epyc-2core.yaml").device
    truth = host.model_copy(update={"efficiency": host.efficiency.model_copy(update={"kernels": {
        **host.efficiency.kernels,
        "unpack": KernelEfficiency(bandwidth=0.1, half_size=1e5, floor=2e-6),
        "dequantize": KernelEfficiency(bandwidth=0.5, half_size=1e5, floor=3e-6)}})})
    groups = [_dequantize_ops(bits, batch, tokens) for bits in (8, 4, 2)
              for batch, tokens in ((1, 128), (1, 1024), (4, 512), (4, 2048))]
    measured = np.array([sum(float(np.mean(cost_op(op, truth).total_s)) for op in g) for g in groups])
    fitted, info = fit_kernel_kinds(host, groups, measured, DEQUANTIZE_KINDS)
    assert info["residuals"]["median_abs_rel_error"] < 0.02
    assert fitted.efficiency.kernels["unpack"].bandwidth == pytest.approx(0.1, rel=0.2)
    assert fitted.efficiency.kernels["norm"] == host.efficiency.kernels["norm"]
