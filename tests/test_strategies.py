"""Memory-hierarchy strategies: offloading, plan search, KV eviction and KIVI residuals."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator import estimate
from simulator.cli import main
from simulator.errors import DoesNotFitError, InferSimError
from simulator.graph.ops import avg
from simulator.specs.loader import load_model, load_system
from simulator.strategies.kv import KVPolicy
from simulator.strategies.offload import NON_LAYER_OPS, OffloadPlan, parse_fractions
from simulator.strategies.plan import search

WS = "workstation-4090"
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(model="llama-2-7b", hardware=WS, **kw):
    kw.setdefault("batch", 1)
    kw.setdefault("input_len", 256)
    kw.setdefault("output_len", 16)
    return estimate(model, hardware, **kw)


@pytest.mark.parametrize("text, message", [
    ("gpu=0.5", "unknown tier 'gpu'"),
    ("host=50", "not a percentage"),
    ("host=0.7,disk=0.6", "more than 1"),
    ("host", "TIER=FRACTION"),
    ("host=abc", "not a number"),
])
def test_bad_fractions_name_the_flag_and_the_fix(text, message):
    with pytest.raises(InferSimError, match=message):
        parse_fractions(text, ("host", "disk"), "--offload-weights")


def test_bad_strategy_flags_exit_2(capsys):
    assert main(["estimate", "--hardware", WS, "--offload-weights", "gpu=0.5"]) == 2
    assert main(["estimate", "--kv-policy", "h2o"]) == 2
    assert main(["estimate", "--hardware", "a100-80gb-sxm", "--offload-weights", "host=0.5"]) == 2
    err = capsys.readouterr().err
    assert "unknown tier" in err and "--kv-budget" in err and "links.host_device" in err
    assert main(["estimate", "--model", "llama-2-7b", "--layers-on-device", "40", "--hardware", WS]) == 2
    assert "between 0 and 32" in capsys.readouterr().err


def test_an_empty_plan_changes_nothing():
    base, same = run(), run(offload=OffloadPlan())
    assert same.ttft_s == base.ttft_s and same.tpot_s == base.tpot_s


def test_offloaded_decode_without_prefetch_adds_the_transfer_by_hand():
    model, system = load_model("llama-2-7b"), load_system(WS)
    base = run(batch=4)
    moved = run(batch=4, offload=OffloadPlan(weights_host=1.0, prefetch=False))
    layer_weights = sum(avg(c.op.weight_bytes) * c.op.count for c in base.decode.costs
                        if c.op.name not in NON_LAYER_OPS)
    link = system.links.host_device
    transfer = layer_weights / (link.bandwidth * link.efficiency) + model.num_layers * link.latency
    assert moved.tpot_s == pytest.approx(base.tpot_s + transfer, rel=1e-9)
    assert moved.to_dict()["decode"]["transfers_s"]["host_to_device"] == pytest.approx(transfer)
    # The device now holds only the embedding, LM head, one layer's buffer, KV and activations.
    assert moved.memory.tiers["device"].parts["weights"] < 0.05 * moved.memory.weights
    assert moved.memory.tiers["host"].parts["weights"] > 0.9 * moved.memory.weights


def test_disk_reads_bind_when_the_drive_is_slowest():
    result = run(model="llama-2-13b", batch=8, offload=OffloadPlan.build(
        load_model("llama-2-13b"), weights="host=0.3,disk=0.5"))
    assert result.decode.bound == "disk read"
    assert set(result.memory.tiers) == {"device", "host", "disk"}


@SLOW
@given(host=st.floats(0, 1), extra=st.floats(0, 1), kv=st.floats(0, 1), batch=st.sampled_from([1, 8, 64]))
def test_offloading_more_never_uses_more_device_memory(host, extra, kv, batch):
    more = min(1.0, host + extra)
    less_plan = OffloadPlan(weights_host=host, kv_host=kv)
    more_plan = OffloadPlan(weights_host=more, kv_host=kv)
    a = run(model="llama-2-13b", batch=batch, offload=less_plan, check_memory=False)
    b = run(model="llama-2-13b", batch=batch, offload=more_plan, check_memory=False)
    assert b.memory.device_used <= a.memory.device_used * (1 + 1e-12)


@SLOW
@given(host=st.floats(0, 1), disk=st.floats(0, 1), kv=st.floats(0, 1), batch=st.sampled_from([1, 4, 32]),
       host_compute=st.booleans())
def test_prefetch_never_makes_a_step_slower(host, disk, kv, batch, host_compute):
    disk = min(disk, 1.0 - host)
    kv = 0.0 if host_compute else kv
    plans = [OffloadPlan(host, disk, kv, prefetch=p, host_compute=host_compute) for p in (True, False)]
    on, off = (run(model="llama-2-13b", batch=batch, offload=p, check_memory=False) for p in plans)
    assert on.ttft_s <= off.ttft_s * (1 + 1e-12) and on.tpot_s <= off.tpot_s * (1 + 1e-12)


def test_host_compute_runs_off_device_layers_on_the_cpu():
    model = load_model("llama-2-13b")
    hybrid = run(model=model, offload=OffloadPlan.build(model, layers_on_device=20, host_compute=True))
    moved = run(model=model, offload=OffloadPlan.build(model, layers_on_device=20))
    assert hybrid.decode.bound == "host compute"
    # At batch 1 the CPU streaming its half of the weights from DDR5 beats moving them over PCIe.
    assert hybrid.tpot_s < moved.tpot_s
    everything = run(model=model, offload=OffloadPlan.build(model, layers_on_device=40, host_compute=True),
                     check_memory=False)
    assert everything.tpot_s == pytest.approx(run(model=model, check_memory=False).tpot_s)


@SLOW
@given(budget=st.integers(16, 4096), smaller=st.integers(1, 4096),
       kind=st.sampled_from(["window", "streaming", "h2o"]))
def test_a_smaller_kv_budget_never_reads_more_bytes(budget, smaller, kind):
    small = max(8, min(budget, smaller))

    def kv_read(b):
        result = run(batch=4, input_len=2048, output_len=64, kv_policy=KVPolicy(kind, b), check_memory=False)
        return sum(avg(c.op.kv_read_bytes) * c.op.count for c in result.decode.costs), result
    big_bytes, big = kv_read(budget)
    small_bytes, little = kv_read(small)
    assert small_bytes <= big_bytes * (1 + 1e-12)
    assert little.memory.kv_cache <= big.memory.kv_cache * (1 + 1e-12)


def test_eviction_bounds_the_cache_and_the_decode_reads():
    full = run(batch=16, input_len=4096, output_len=256, hardware="a100-80gb-sxm")
    h2o = run(batch=16, input_len=4096, output_len=256, hardware="a100-80gb-sxm",
              kv_policy=KVPolicy("h2o", 0.2))
    budget = h2o.strategy["kv_policy"]["budget_tokens"]
    assert budget == pytest.approx(0.2 * (4096 + 256), abs=1)
    assert h2o.memory.kv_cache == pytest.approx(full.memory.kv_cache * budget / (4096 + 255))
    assert h2o.tpot_s < 0.7 * full.tpot_s
    assert any(c.op.name == "h2o_scores" for c in h2o.decode.costs)
    assert h2o.ttft_s == pytest.approx(full.ttft_s)  # prefill attends to the whole prompt


def test_kivi_residual_costs_a_little_over_plain_quantization():
    shape = dict(batch=16, input_len=4096, output_len=256, hardware="a100-80gb-sxm")
    full, int2 = run(**shape), run(kv_dtype="int2", **shape)
    kivi = run(kv_dtype="int2", kv_residual=128, **shape)
    assert int2.memory.kv_cache < kivi.memory.kv_cache < 0.25 * full.memory.kv_cache
    assert int2.tpot_s < kivi.tpot_s < full.tpot_s


def test_plan_search_fits_and_says_what_binds():
    choice = search("opt-30b", WS, input_len=512, output_len=32)
    tiers = choice.result.memory.tiers
    assert all(t.fits for t in tiers.values())
    assert choice.plan.weights_off > 0.5 and "device memory" in choice.binding
    latency = search("llama-2-7b", WS, input_len=512, output_len=32, objective="latency")
    assert latency.batch == 1 and not latency.plan.active  # fits on the device: nothing to move
    disk_only = search("llama-3.1-405b", WS, input_len=512, output_len=32, batch=1)
    assert disk_only.plan.weights_disk > 0 and disk_only.result.decode.bound == "disk read"
    no_drive = load_system(WS).model_copy(update={"storage": None})
    with pytest.raises(DoesNotFitError, match="fits no placement"):
        search("llama-3.1-405b", no_drive, input_len=512, output_len=32, batch=1)


@SLOW
@given(model=st.sampled_from(["llama-2-13b", "opt-30b", "mixtral-8x7b", "llama-2-70b"]),
       input_len=st.sampled_from([128, 1024]), objective=st.sampled_from(["throughput", "latency"]))
def test_every_plan_the_search_returns_fits(model, input_len, objective):
    choice = search(model, WS, input_len=input_len, output_len=16, objective=objective, max_batch=256)
    assert all(t.fits for t in choice.result.memory.tiers.values())


def test_plan_cli_json(capsys):
    assert main(["plan", "--model", "llama-2-13b", "--output-len", "16", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["weights"]["host"] > 0 and out["estimate"]["memory_bytes"]["tiers"]["host"]["used"] > 0
    assert "transfer_wait_s" in out["estimate"]["decode"]


def test_expert_misses_match_the_graph_under_uniform_routing_and_fall_with_skew():
    from simulator.graph.transformer import expected_experts_touched
    from simulator.strategies.offload import expert_misses

    touched, missed = expert_misses(8, 2, 5.0, cached=0, skew=0.0)
    assert touched == pytest.approx(expected_experts_touched(8, 2, 5.0))
    assert missed == pytest.approx(touched)
    _, half = expert_misses(8, 2, 5.0, cached=4, skew=0.0)
    _, skewed = expert_misses(8, 2, 5.0, cached=4, skew=1.2)
    assert skewed < half < touched
    assert expert_misses(8, 2, 5.0, cached=8, skew=0.7)[1] == pytest.approx(0.0)


def test_expert_cache_trades_device_memory_for_fetches():
    shape = dict(model="mixtral-8x7b", weight_dtype="int4", input_len=512, output_len=32)
    plans = [OffloadPlan(expert_cache=c) for c in (1.0, 0.5, 0.25)]
    full, half, quarter = (run(offload=p, check_memory=False, **shape) for p in plans)
    devices = [r.memory.tiers["device"].used for r in (full, half, quarter)]
    assert devices[0] > devices[1] > devices[2]
    assert full.tpot_s < half.tpot_s < quarter.tpot_s
    predicted = run(offload=OffloadPlan(expert_cache=0.5, expert_prefetch=1.0), check_memory=False, **shape)
    assert predicted.tpot_s < half.tpot_s  # fetches predicted a layer ahead hide under compute
    skewed = run(offload=OffloadPlan(expert_cache=0.5, routing_skew=1.5), check_memory=False, **shape)
    assert skewed.tpot_s < half.tpot_s
    on_cpu = run(offload=OffloadPlan(expert_cache=0.25, experts_on_host=True), check_memory=False, **shape)
    assert on_cpu.tpot_s < quarter.tpot_s  # at batch 1 the CPU beats moving experts over PCIe
    with pytest.raises(InferSimError, match="mixture-of-experts"):
        OffloadPlan.build(load_model("llama-2-7b"), expert_cache=0.5)


def test_scenarios_run_and_bad_scenarios_name_the_field(tmp_path, capsys):
    from pathlib import Path

    from simulator.scenario import run_scenario

    folder = Path(__file__).resolve().parents[1] / "workloads" / "scenarios"
    for path in sorted(folder.glob("*.yaml")):
        result = run_scenario(path)
        assert result.ttft_s > 0 and result.strategy
    assert main(["run", str(folder / "llama-13b-4090-offload.yaml"), "--json"]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: llama-2-7b\nhardware: workstation-4090\nstrategy:\n  kv: {polcy: h2o}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "strategy.kv.polcy" in err and "unknown field" in err
    bad.write_text("model: llama-2-7b\nhardware: workstation-4090\n"
                   "strategy:\n  offload: {weights: {host: 1.5}}\n")
    assert main(["run", str(bad)]) == 2
    assert "between 0 and 1" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3.1-8b"])
def test_xquant_caches_the_layer_input_and_recomputes_kv(model):
    spec = load_model(model)
    shape = dict(model=model, hardware="a100-80gb-sxm", batch=8, input_len=2048, output_len=64)
    kv, x = run(**shape), run(kv_store="x", **shape)
    ratio = spec.hidden_size / (2 * spec.kv_heads * spec.head_size)
    assert x.memory.kv_cache == pytest.approx(kv.memory.kv_cache * ratio)
    recompute = [c for c in x.decode.costs if c.op.name == "kv_recompute"]
    assert recompute and avg(recompute[0].op.flops) > 0
    assert x.ttft_s == pytest.approx(kv.ttft_s, rel=0.05)  # prefill only writes X instead of K, V
    low_bit = run(kv_store="x", kv_dtype="int2", **shape)
    assert low_bit.memory.kv_cache < x.memory.kv_cache / 6
    with pytest.raises(InferSimError, match="MLA"):
        run(model="deepseek-v2-lite", hardware="a100-80gb-sxm", kv_store="x")


def test_the_public_api_exposes_the_strategies():
    import simulator

    result = simulator.estimate("llama-2-13b", WS, batch=8, offload=simulator.OffloadPlan(weights_host=0.5),
                                kv_policy=simulator.KVPolicy("h2o", 0.2))
    assert result.strategy["offload"]["weights"]["host"] == 0.5
    assert simulator.search_plan("opt-30b", WS, output_len=16, max_batch=64).batch >= 1


def test_speculation_tokens_per_round_and_when_it_pays():
    from simulator.strategies.speculative import Speculation, break_even_alpha, expected_tokens

    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.999999, 4) == pytest.approx(5.0, rel=1e-4)
    assert Speculation("tiny-dense-58m", 3, None, (1.0, 0.5, 0.5)).expected_tokens() == 1 + 1 + 0.5 + 0.25
    shape = dict(model="llama-2-13b", hardware="h100-sxm", batch=1, input_len=1024, output_len=128)
    plain = run(**shape)
    never = run(speculative=Speculation("tiny-dense-58m", 4, 0.0), **shape)
    always = run(speculative=Speculation("tiny-dense-58m", 4, 1.0), **shape)
    assert never.tpot_s > plain.tpot_s and any("slower than plain" in w for w in never.warnings)
    assert always.tpot_s < plain.tpot_s / 2
    info = always.strategy["speculative"]
    assert info["expected_tokens_per_round"] == 5.0 and info["pays"]
    assert 0.0 < info["break_even_alpha"] < 1.0
    assert always.memory.weights > plain.memory.weights  # the draft's weights are on the device too
    assert break_even_alpha(4, 10.0, 1.0) is None  # a round dearer than gamma + 1 plain steps never pays


@SLOW
@given(alpha=st.floats(0, 1), more=st.floats(0, 1), gamma=st.integers(1, 8))
def test_a_higher_acceptance_never_slows_speculation(alpha, more, gamma):
    from simulator.strategies.speculative import Speculation

    high = min(1.0, alpha + more)
    shape = dict(model="llama-2-13b", hardware="h100-sxm", batch=2, input_len=256, output_len=16)
    low_r = run(speculative=Speculation("tiny-dense-58m", gamma, alpha), **shape)
    high_r = run(speculative=Speculation("tiny-dense-58m", gamma, high), **shape)
    assert high_r.tpot_s <= low_r.tpot_s * (1 + 1e-12)


def test_bad_speculation_is_a_clear_error(capsys):
    from simulator.strategies.speculative import Speculation

    with pytest.raises(InferSimError, match="vocabulary"):
        run(model="llama-3.1-8b", speculative=Speculation("tiny-dense-58m", 4, 0.8))
    with pytest.raises(InferSimError, match="gamma"):
        Speculation("tiny-dense-58m", 0, 0.8)
    with pytest.raises(InferSimError, match="profile"):
        Speculation("tiny-dense-58m", 3, None, (0.9, 0.8))
    assert main(["estimate", "--model", "llama-2-13b", "--hardware", "h100-sxm", "--draft-model",
                 "tiny-dense-58m", "--spec-alpha", "1.5"]) == 2
    assert "--spec-alpha" in capsys.readouterr().err
    assert main(["estimate", "--model", "llama-2-13b", "--hardware", "h100-sxm", "--draft-model",
                 "tiny-dense-58m", "--spec-gamma", "3", "--spec-profile", "0.9,0.8,0.7", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["strategy"]["speculative"]["expected_tokens_per_round"] == pytest.approx(1 + .9 + .72 + .504)


def test_separately_dequantized_weights_cost_a_kernel_each_and_move_packed():
    import simulator
    from simulator.strategies.offload import OffloadPlan

    options = dict(batch=8, input_len=512, output_len=32, weight_dtype="int4")
    fused = simulator.estimate("llama-2-7b", "a100-80gb-sxm", **options)
    separate = simulator.estimate("llama-2-7b", "a100-80gb-sxm", weight_dequant="separate", **options)
    ops = {row["op"]: row for row in separate.decode.op_rows()}
    qkv, dequant = ops["qkv_proj"], ops["qkv_proj_dequantize"]
    fused_qkv = next(row for row in fused.decode.op_rows() if row["op"] == "qkv_proj")
    assert dequant["weight_bytes"] == pytest.approx(fused_qkv["weight_bytes"])  # the packed int4 bytes
    assert qkv["weight_bytes"] == 0  # the GEMM reads the fp16 copy, a transient buffer
    assert separate.tpot_s > fused.tpot_s and separate.ttft_s > fused.ttft_s
    assert "lm_head_dequantize" not in ops  # the head stays in the activation dtype
    # An offload plan moves the packed bytes either way.
    plan = OffloadPlan(weights_host=0.5)
    moved = [simulator.estimate("llama-2-13b", "workstation-4090", offload=plan, weight_dequant=d, **options)
             .decode.transfers_s for d in ("fused", "separate")]
    assert moved[0] and moved[0] == pytest.approx(moved[1])
    # 16-bit weights have nothing to dequantize.
    half = dict(options, weight_dtype="fp16")
    assert simulator.estimate("llama-2-7b", "a100-80gb-sxm", weight_dequant="separate", **half).tpot_s == \
        simulator.estimate("llama-2-7b", "a100-80gb-sxm", **half).tpot_s
    with pytest.raises(simulator.InferSimError, match="weight_dequant"):
        simulator.estimate("llama-2-7b", "a100-80gb-sxm", weight_dequant="eager", **options)


def test_a_sweep_takes_weight_dequant_as_an_axis_and_matches_estimate():
    import simulator

    study = simulator.sweep({"model": "llama-2-7b", "hardware": "a100-80gb-sxm", "weight_dtype": "int4",
                             "weight_dequant": ["fused", "separate"], "batch": [1, 8]})
    for row in study.itertuples():
        single = simulator.estimate("llama-2-7b", "a100-80gb-sxm", batch=row.batch, weight_dtype="int4",
                                    weight_dequant=row.weight_dequant)
        assert row.tpot_s == pytest.approx(single.tpot_s)
    by = study.set_index(["weight_dequant", "batch"])["tpot_s"]
    assert by["separate", 8] > by["fused", 8]


def test_eager_kivi_quantizes_what_enters_the_codes_and_prefill_dequantizes_nothing_new():
    from simulator.graph.transformer import Precision, StepShape, build_step

    model = load_model("tiny-dense-58m")

    def ops(phase, context, bits=4, residual=0, attention="naive"):
        precision = Precision(weight="fp32", kv=f"int{bits}", act="fp32", compute="fp32",
                              kv_residual=residual)
        new = context if phase == "prefill" else 1
        return {op.name: op for op in build_step(model, StepShape(phase, 4, new, float(context)), precision,
                                                 attention)}

    decode = ops("decode", 1030)
    assert {"kv_quantize", "kv_unpack", "kv_dequantize"} <= set(decode)
    assert "kv_quantize" not in ops("decode", 1030, attention="flash")  # fused: in the cache write
    # A key joining a fuller group requantizes more of it; int2 packs in more passes than int8.
    fuller = ops("decode", 1100)["kv_quantize"]
    assert fuller.bytes * fuller.count > decode["kv_quantize"].bytes * decode["kv_quantize"].count
    assert ops("decode", 1030, bits=2)["kv_quantize"].count > ops("decode", 1030, bits=8)["kv_quantize"].count
    prefill = ops("prefill", 1024)
    assert prefill["kv_quantize"].bytes > 0
    # The prompt is attended as computed: nothing to dequantize (the op stays, empty, for the engine).
    assert prefill["kv_dequantize"].bytes == 0 and prefill["kv_unpack"].bytes == 0
    chunk = ops("prefill", 1024, residual=128)  # the prompt's last 128 tokens stay out of the codes
    assert ops("prefill", 1024)["kv_quantize"].bytes > chunk["kv_quantize"].bytes > 0


def test_each_read_from_a_calibrated_drive_pays_its_fixed_cost():
    from simulator.specs.hardware import _calibrated_storage
    from simulator.specs.loader import load_device

    device = load_device("hardware_specs/local/epyc-2core-0623.yaml")
    fit = dict(device.efficiency.fit or {})
    disk = {k: v for k, v in fit["disk"].items() if k != "read_per_file"}

    def with_reads(latency_s):
        per_file = {} if latency_s is None else {"latency_s": latency_s, "bandwidth": 2e9}
        drive = {**disk, "read_per_file": per_file}
        efficiency = device.efficiency.model_copy(update={"fit": {**fit, "disk": drive}})
        return device.model_copy(update={"efficiency": efficiency})

    older = _calibrated_storage(with_reads(None))  # calibrated before the per-file fit
    assert older is not None and older.latency == pytest.approx(disk["latency_4k_s"])
    assert older.read_bandwidth == pytest.approx(disk["read_into_buffer"]["bandwidth"])
    fast, slow = with_reads(1e-6), with_reads(2e-3)
    assert _calibrated_storage(slow).latency == 2e-3 and _calibrated_storage(slow).read_bandwidth == 2e9
    options = dict(weight_dtype="fp32", kv_dtype="fp32", act_dtype="fp32", attention="naive", batch=1,
                   input_len=32, output_len=4, check_memory=False)
    moe = load_model("tiny-moe-140m")
    plan = OffloadPlan.build(moe, expert_cache=0.25)
    reads = {name: estimate(moe, d, offload=plan, **options).decode.transfers_s["expert_fetch_on_demand"]
             for name, d in (("fast", fast), ("slow", slow))}
    # 8 MoE layers, 2 routed experts each, 6 of 8 on disk: 12 files a step on average.
    assert reads["slow"] - reads["fast"] == pytest.approx(12 * (2e-3 - 1e-6), rel=1e-6)
    dense = load_model("tiny-dense-58m")
    half = OffloadPlan(weights_disk=0.5)
    layers = {name: estimate(dense, d, offload=half, **options).decode.transfers_s["disk_read"]
              for name, d in (("fast", fast), ("slow", slow))}
    assert layers["slow"] - layers["fast"] == pytest.approx(4 * (2e-3 - 1e-6), rel=1e-6)  # 4 layer files
