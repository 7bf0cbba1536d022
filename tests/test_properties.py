"""Physical properties of the roofline model, over random shapes and every shipped spec."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulator import estimate
from simulator.specs.fields import EfficiencyCurve
from simulator.specs.hardware import DeviceEfficiency
from simulator.specs.loader import load_device, load_model, shipped_devices, shipped_models

DENSE = ["llama-2-7b", "llama-3.1-8b", "mistral-7b", "opt-6.7b"]
MIXED = DENSE + ["mixtral-8x7b", "deepseek-v2-lite", "qwen3-30b-a3b"]

shapes = st.fixed_dictionaries({
    "batch": st.integers(1, 64),
    "input_len": st.integers(1, 4096),
    "output_len": st.integers(2, 512),
})


def scaled_bandwidth(device, factor):
    tier = device.memory[0]
    return device.model_copy(update={
        "memory": (tier.model_copy(update={"bandwidth": tier.bandwidth * factor}), *device.memory[1:])
    })


def scaled_compute(device, factor):
    return device.model_copy(update={"compute": {k: v * factor for k, v in device.compute.items()}})


def run(model, device, **shape):
    return estimate(model, device, check_memory=False, **shape)


@given(st.sampled_from(MIXED), st.sampled_from(["a100-80gb-sxm", "h100-sxm", "l4"]), shapes,
       st.floats(1.0, 8.0))
def test_more_bandwidth_is_never_slower(model, device_name, shape, factor):
    device = load_device(device_name)
    base, faster = run(model, device, **shape), run(model, scaled_bandwidth(device, factor), **shape)
    assert faster.ttft_s <= base.ttft_s * (1 + 1e-12)
    assert faster.tpot_s <= base.tpot_s * (1 + 1e-12)


@given(st.sampled_from(MIXED), st.sampled_from(["a100-80gb-sxm", "h100-sxm", "l4"]), shapes,
       st.floats(1.0, 8.0))
def test_more_flops_is_never_slower(model, device_name, shape, factor):
    device = load_device(device_name)
    base, faster = run(model, device, **shape), run(model, scaled_compute(device, factor), **shape)
    assert faster.ttft_s <= base.ttft_s * (1 + 1e-12)
    assert faster.tpot_s <= base.tpot_s * (1 + 1e-12)


@given(st.sampled_from(MIXED), shapes)
def test_longer_prompts_and_bigger_batches_cost_more(model, shape):
    base = run(model, "h100-sxm", **shape)
    longer = run(model, "h100-sxm", **{**shape, "input_len": shape["input_len"] + 64})
    bigger = run(model, "h100-sxm", **{**shape, "batch": shape["batch"] + 1})
    assert longer.ttft_s >= base.ttft_s and longer.tpot_s >= base.tpot_s
    assert bigger.ttft_s >= base.ttft_s and bigger.tpot_s >= base.tpot_s
    assert bigger.memory.total > base.memory.total


def dense_models():
    return [name for name in shipped_models() if not load_model(name).is_moe]


@pytest.mark.parametrize("device_name", sorted(shipped_devices()))
def test_decode_at_batch_1_is_memory_bound_for_every_dense_model(device_name):
    # Models of a billion parameters and more: a GPU streams their weights at batch 1. The
    # executor's CPU-sized shapes (a 384-wide decoder's GEMMs are one partial wave of tiles on an
    # H100, 0.7 us against 0.13 us of weights) are bound by neither roof on a GPU.
    for model in (name for name in dense_models() if load_model(name).params() >= 1e9):
        result = run(model, device_name, batch=1, input_len=512, output_len=64)
        assert result.decode.bound == "memory", (model, device_name)


# --- every efficiency and power parameter moves the output --------------------------------

def with_efficiency(device, **changes):
    return device.model_copy(update={"efficiency": device.efficiency.model_copy(update=changes)})


def with_power(device, **changes):
    return device.model_copy(update={"power": device.power.model_copy(update=changes)})


SHAPE = {"batch": 8, "input_len": 1024, "output_len": 64}


def metrics(device):
    r = run("llama-2-7b", device, **SHAPE)
    return r.ttft_s, r.tpot_s, r.energy_j


@pytest.mark.parametrize(
    ("field", "value", "moves"),
    [
        ("compute", EfficiencyCurve(points=((1.0, 0.35),)), "ttft"),
        ("compute", EfficiencyCurve(points=((1e6, 0.1), (1e12, 0.9))), "ttft"),
        ("memory", EfficiencyCurve(points=((1.0, 0.4),)), "tpot"),
        ("memory", EfficiencyCurve(points=((1e3, 0.1), (1e9, 0.95))), "tpot"),
        ("kernel_overhead", 50e-6, "both"),
    ],
)
def test_every_efficiency_parameter_moves_the_output(field, value, moves):
    # The datasheet device: no tile model or per-kernel entries to shadow the curves.
    device = load_device("h100-sxm").model_copy(update={"efficiency": DeviceEfficiency()})
    ttft, tpot, _ = metrics(device)
    ttft2, tpot2, _ = metrics(with_efficiency(device, **{field: value}))
    if moves in ("ttft", "both"):
        assert ttft2 != pytest.approx(ttft, rel=1e-3)
    if moves in ("tpot", "both"):
        assert tpot2 != pytest.approx(tpot, rel=1e-3)


@pytest.mark.parametrize(
    ("field", "value"),
    [("efficiency", 0.5), ("operand_bandwidth", 2e12), ("tile_overhead", 20e-6),
     ("call_overhead", 20e-6), ("tiles", ((128, 128),)), ("split_k", (1,))],
)
def test_every_gemm_tiling_parameter_moves_prefill(field, value):
    device = load_device("h100-sxm")
    assert device.efficiency.gemm is not None
    tiling = device.efficiency.gemm.model_copy(update={field: value})
    changed = with_efficiency(device, gemm=tiling)
    # Short prompts feel splits and per-tile costs; long ones the tile rate and shapes.
    moved = []
    for prompt in (96, 1000, 4096):
        shape = {"batch": 1, "input_len": prompt, "output_len": 2}
        base_ttft = run("llama-2-7b", device, **shape).ttft_s
        moved.append(run("llama-2-7b", changed, **shape).ttft_s != pytest.approx(base_ttft, rel=1e-3))
    assert any(moved)


def test_the_gemm_call_overhead_is_paid_once_per_gemm_and_by_nothing_else():
    from simulator.cost.roofline import cost_op
    from simulator.graph.transformer import Precision, StepShape, build_step

    device = load_device("h100-sxm")
    assert device.efficiency.gemm is not None
    slower = with_efficiency(device, gemm=device.efficiency.gemm.model_copy(
        update={"call_overhead": device.efficiency.gemm.call_overhead + 10e-6}))
    precision = Precision(weight="bf16", kv="bf16", act="bf16", compute="bf16")
    ops = build_step(load_model("llama-2-7b"), StepShape("prefill", 1, 512.0, 512.0), precision)
    for op in ops:
        added = cost_op(op, slower).time_s - cost_op(op, device).time_s
        assert added == pytest.approx(10e-6 if op.kind == "gemm" else 0.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["gemm", "norm", "rope", "activation", "embedding", "elementwise"])
@pytest.mark.parametrize("field", ["bandwidth", "half_size", "floor"])
def test_every_kernel_entry_moves_the_output(kind, field):
    device = load_device("h100-sxm")
    entry = device.efficiency.kernels[kind]
    value = {"bandwidth": entry.bandwidth / 2, "half_size": entry.half_size * 10 + 1e6,
             "floor": entry.floor * 10 + 1e-4}[field]
    kernels = {**device.efficiency.kernels, kind: entry.model_copy(update={field: value})}
    changed = with_efficiency(device, kernels=kernels)
    before, after = metrics(device), metrics(changed)
    assert after[:2] != pytest.approx(before[:2], rel=1e-4)


@pytest.mark.parametrize(
    ("field", "value"),
    [("idle", 150.0), ("max", 350.0), ("energy_per_flop", 1e-12), ("energy_per_byte", 50e-12),
     ("compute_share", 0.3), ("memory_share", 0.9)],
)
def test_every_power_parameter_moves_the_energy(field, value):
    device = load_device("h100-sxm")
    _, _, energy = metrics(device)
    _, _, energy2 = metrics(with_power(device, **{field: value}))
    assert energy2 != pytest.approx(energy, rel=1e-3)


def test_power_never_exceeds_the_cap():
    device = with_power(load_device("h100-sxm"), energy_per_flop=10e-12, energy_per_byte=100e-12)
    result = run("llama-2-7b", device, batch=64, input_len=2048, output_len=16)
    op_powers = [float(c.energy_j / c.time_s) for c in result.prefill.costs]
    assert max(op_powers) <= device.power.max + 1e-9
    assert max(op_powers) == pytest.approx(device.power.max)  # the big GEMMs hit the cap
    assert min(op_powers) >= device.power.idle
    assert device.power.idle <= result.power_w <= device.power.max
