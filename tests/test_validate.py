"""The executor validation path: suites, predicted-vs-measured, thresholds, bad input."""

import pandas as pd
import pytest

from simulator.cli import main
from validation.compare import predict, summarize
from validation.measure import suite


def test_suites_cover_the_promised_grid():
    quick, full = suite("quick"), suite("full")
    assert 10 <= len(quick) <= 14
    assert len(full) >= 60
    assert {c.model for c in full} >= {"tiny-dense-58m", "tiny-moe-140m", "small-dense-250m"}
    assert min(c.batch for c in full) == 1 and max(c.batch for c in full) == 32
    assert min(c.input_len for c in full) == 128 and max(c.input_len for c in full) == 4096


def synthetic_measurements(tmp_path, scale=1.0):
    """Measurements that are the simulator's own predictions times ``scale``."""
    cases = pd.DataFrame([
        {"case": f"c{i}", "model": "tiny-dense-58m", "batch": b, "input_len": p, "output_len": 8,
         "ttft_median_s": 1.0, "tpot_median_s": 1.0, "ttft_cv": 0.01, "tpot_cv": 0.02}
        for i, (b, p) in enumerate([(1, 128), (4, 256), (16, 512)])
    ])
    predicted = predict(cases, "h100-sxm")
    cases["ttft_median_s"] = predicted["ttft_pred_s"] * scale
    cases["tpot_median_s"] = predicted["tpot_pred_s"] * scale
    path = tmp_path / "m.csv"
    cases.to_csv(path, index=False)
    return path


def test_a_perfect_prediction_has_zero_error(tmp_path):
    frame = predict(pd.read_csv(synthetic_measurements(tmp_path)), "h100-sxm")
    summary = summarize(frame)
    assert summary["ttft"]["median_abs_error"] == pytest.approx(0, abs=1e-9)
    assert summary["tpot"]["p90_abs_error"] == pytest.approx(0, abs=1e-9)


def test_thresholds_set_the_exit_code(tmp_path, capsys):
    slow = synthetic_measurements(tmp_path, scale=1.5)  # measured 50% slower than predicted
    report = tmp_path / "report.md"
    args = ["validate", "--measurements", str(slow), "--hardware", "h100-sxm", "--report", str(report)]
    assert main([*args, "--max-median-error", "0.5"]) == 0
    assert main([*args, "--max-median-error", "0.25"]) == 1
    text = report.read_text()
    assert "-33.3%" in text and "TTFT" in text


def test_bad_measurements_file(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("case,model\nx,tiny-dense-58m\n")
    assert main(["validate", "--measurements", str(path), "--hardware", "h100-sxm"]) == 2
    assert "missing columns" in capsys.readouterr().err


def test_rounds_keep_the_fastest_rounds_median_and_validate_compares_with_it(tmp_path):
    from validation.measure import Case, _Samples

    detail = {"e2e_s": 1.0, "dispatch_s_per_step": {"prefill": 0.0, "decode": 0.0},
              "kernels_per_step": {"decode": 1}, "peak_memory_bytes": 1}
    samples = _Samples(ttft=[[3.0, 3.2], [2.0, 2.4], [5.0, 5.0]], tpot=[[1.0], [0.5], [2.0]],
                       details=[detail] * 3, loads=[(0.1, 0.2)] * 3)
    row = samples.row(Case("tiny-dense-58m", 1, 128, 8))
    assert row["ttft_best_s"] == pytest.approx(2.2) and row["tpot_best_s"] == 0.5
    assert row["ttft_median_s"] == pytest.approx(3.1) and row["rounds"] == 3 and row["repeats"] == 6

    frame = pd.DataFrame([{**row, "ttft_best_s": 1.0, "ttft_median_s": 2.0}])
    out = predict(frame, "h100-sxm")
    assert out["ttft_error"][0] == pytest.approx(out["ttft_pred_s"][0] - 1.0)
    assert out["ttft_error_vs_median"][0] == pytest.approx(out["ttft_pred_s"][0] / 2.0 - 1.0)


def test_calibration_passes_keep_each_points_fastest():
    from simulator.calibrate.host import Points, _ops_at

    ops = _ops_at(1)
    first, second = Points(), Points()
    first.add(ops["o_proj"], 2.0, m=1)
    first.add(ops["qkv_proj"], 1.0, m=1)
    second.add(ops["o_proj"], 1.5, m=1)
    second.add(ops["qkv_proj"], 3.0, m=1)
    assert first.best_of(second).measured_s == [1.5, 1.0]
    other = Points()
    other.add(ops["mlp_up_proj"], 1.0)
    other.add(ops["qkv_proj"], 1.0)
    with pytest.raises(ValueError):
        first.best_of(other)


def test_a_packing_blas_adds_weight_stream_to_math_but_not_for_one_row():
    from simulator.calibrate.host import _ops_at, host_tiling
    from simulator.cost.roofline import cost_op
    from simulator.specs.hardware import DeviceEfficiency, KernelEfficiency
    from simulator.specs.loader import load_device

    base = load_device("hardware_specs/local/epyc-2core.yaml")
    kernels = {"gemm": KernelEfficiency(bandwidth=1.0, half_size=0.0, floor=0.0),
               "gemv": KernelEfficiency(bandwidth=1.0, half_size=0.0, floor=0.0)}
    packed_tiling = host_tiling()
    assert packed_tiling.pack_pass
    devices = {pack: base.model_copy(update={"efficiency": DeviceEfficiency(
        kernel_overhead=0.0, kernels=kernels, gemm=packed_tiling.model_copy(update={"pack_pass": pack}))})
        for pack in (False, True)}
    for rows in (8, 32, 512):
        op = _ops_at(rows)["qkv_proj"]
        plain, packed = cost_op(op, devices[False]), cost_op(op, devices[True])
        assert packed.time_s == pytest.approx(plain.compute_s + plain.memory_s)
        assert packed.time_s > plain.time_s
    one_row = _ops_at(1)["qkv_proj"]
    assert cost_op(one_row, devices[True]).time_s == pytest.approx(cost_op(one_row, devices[False]).time_s)


def test_kernels_are_timed_after_a_cache_of_gemms():
    from simulator.calibrate.host import AfterGemm

    cache = 8 * 2**20
    context = AfterGemm(cache, hidden=256, width=1024)  # 1 MiB of weights a GEMM
    assert context.per_flush == 8 and len(context.weights) >= 16
    calls = []
    context.time(lambda: calls.append(context.turn), repeats=3)
    assert calls == [0, 8, 16, 24]  # the warm-up call, then each timed call after 8 fresh GEMMs


def test_a_runtime_looping_over_experts_pays_a_kernel_per_touched_expert():
    import simulator
    from simulator.specs.loader import load_device

    base = load_device("hardware_specs/local/epyc-2core-pack.yaml")
    assert base.efficiency.expert_loop  # the executor runs its experts one by one
    fused = base.model_copy(update={"efficiency": base.efficiency.model_copy(update={"expert_loop": False})})
    options = dict(batch=4, input_len=256, output_len=8, weight_dtype="fp32", kv_dtype="fp32",
                   act_dtype="fp32", attention="naive")
    looped = simulator.estimate("tiny-moe-140m", base, **options)
    grouped = simulator.estimate("tiny-moe-140m", fused, **options)
    per_op = {row["op"]: row for row in looped.decode.op_rows()}
    fused_op = {row["op"]: row for row in grouped.decode.op_rows()}
    for name in ("experts_up_proj", "experts_act", "experts_gather", "expert_combine"):
        assert per_op[name]["overhead_s"] > 2 * fused_op[name]["overhead_s"]  # > 2 experts touched
    assert per_op["qkv_proj"]["time_s"] == pytest.approx(fused_op["qkv_proj"]["time_s"])
    assert looped.tpot_s > grouped.tpot_s
    dense = {device.efficiency.expert_loop: simulator.estimate("tiny-dense-58m", device, **options).tpot_s
             for device in (base, fused)}
    assert dense[True] == pytest.approx(dense[False])


def test_per_op_comparison_lines_up_the_executors_ops_with_the_estimates():
    from simulator.errors import InferSimError
    from validation.measure import Case
    from validation.ops import compare_ops

    spec = "hardware_specs/local/epyc-2core-pack.yaml"
    frame, totals = compare_ops(Case("tiny-dense-58m", 1, 16, 3), spec, repeats=1)
    ops = frame.set_index("op")
    for name in ("qkv_proj", "attention", "mlp_up_proj", "lm_head"):
        assert ops.loc[name, "measured_s"] > 0 and ops.loc[name, "predicted_s"] > 0
    assert ops.loc["qkv_proj", "calls"] == 8  # one per layer
    assert "attention_scores" not in ops.index  # the eager-attention ops are summed into one call
    assert totals["predicted_step_s"] == pytest.approx(frame["predicted_s"].sum())
    assert list(frame["error_s"].abs()) == sorted(frame["error_s"].abs(), reverse=True)
    with pytest.raises(InferSimError):
        compare_ops(Case("tiny-dense-58m", 1, 16, 3), spec, phase="verify")
    # A strategy case runs and is priced as validation.measure and infersim validate do.
    frame, _ = compare_ops(Case("tiny-dense-58m", 2, 16, 3, kv_bits=4), spec, repeats=1)
    ops = frame.set_index("op")
    for name in ("kv_quantize", "kv_dequantize"):
        assert ops.loc[name, "measured_s"] > 0 and ops.loc[name, "predicted_s"] > 0


def test_per_op_comparison_lists_a_strategys_reads_under_the_executors_name():
    from validation.measure import Case
    from validation.ops import predicted_ops

    times, step_s = predicted_ops(Case("tiny-moe-140m", 1, 16, 3, expert_cache=0.25),
                                  "hardware_specs/local/epyc-2core-0623.yaml", "decode")
    assert times["expert_load"] > 0 and "expert_fetch_on_demand" not in times
    assert step_s == pytest.approx(sum(times.values()))


def _host_with_volumes(scales: tuple[float, ...] = (0.5, 1.0, 2.0)):
    from simulator.specs.hardware import KernelVolume
    from simulator.specs.loader import load_device

    base = load_device("hardware_specs/local/epyc-2core-pack.yaml")
    norm = base.efficiency.kernels["norm"]
    volumes = tuple(KernelVolume(volume=size, kernels={"norm": norm.model_copy(update={
        "bandwidth": norm.bandwidth / s, "floor": norm.floor * s})})
        for size, s in zip((8e6, 32e6, 128e6), scales, strict=True))
    timed = base.efficiency.model_copy(update={"volumes": volumes})
    return base, base.model_copy(update={"efficiency": timed})


def test_a_kernel_costs_what_it_costs_after_the_bytes_its_layer_moves():
    import dataclasses

    from simulator.calibrate.host import _ops_at
    from simulator.cost.roofline import cost_op

    base, device = _host_with_volumes()
    norm = _ops_at(16)["input_norm"]

    def busy(interval: float) -> float:
        cost = cost_op(dataclasses.replace(norm, interval_bytes=interval), device)
        return cost.time_s - cost.overhead_s

    plain = cost_op(norm, base).time_s - cost_op(norm, base).overhead_s
    assert busy(0.0) == pytest.approx(plain)  # interval not known: the plain kernels
    assert busy(32e6) == pytest.approx(plain)
    assert busy(8e6) == pytest.approx(plain / 2) and busy(1e6) == pytest.approx(plain / 2)  # held below
    assert busy(128e6) == pytest.approx(2 * plain) and busy(1e9) == pytest.approx(2 * plain)
    between = [busy(v) for v in (8e6, 12e6, 20e6, 32e6, 60e6, 128e6)]
    assert between == sorted(between)
    assert busy(16e6) == pytest.approx(0.75 * plain)  # halfway in log volume
    rope = dataclasses.replace(_ops_at(16)["rope"], interval_bytes=1e6)  # no volumes for its kind
    assert cost_op(rope, device).time_s == pytest.approx(cost_op(rope, base).time_s)


def test_a_step_prices_its_kernels_by_its_layers_bytes():
    import simulator

    base, device = _host_with_volumes()
    options = dict(batch=1, input_len=64, output_len=4, weight_dtype="fp32", kv_dtype="fp32",
                   act_dtype="fp32", attention="naive")
    # tiny-dense-58m moves ~13 MB a layer (between the 8 and 32 MB volumes), small-dense-250m
    # ~47 MB (above 32): one runs its norms faster than the plain kernels say, the other slower.
    for model, faster in (("tiny-dense-58m", True), ("small-dense-250m", False)):
        plain = {r["op"]: r for r in simulator.estimate(model, base, **options).decode.op_rows()}
        timed = {r["op"]: r for r in simulator.estimate(model, device, **options).decode.op_rows()}
        assert (timed["input_norm"]["time_s"] < plain["input_norm"]["time_s"]) == faster
        assert timed["qkv_proj"]["time_s"] == pytest.approx(plain["qkv_proj"]["time_s"])


def test_volumes_must_ascend_and_name_the_same_kinds():
    from pydantic import ValidationError

    from simulator.specs.hardware import DeviceEfficiency, KernelEfficiency, KernelVolume

    kernel = KernelEfficiency(bandwidth=0.5)
    with pytest.raises(ValidationError, match="smallest first"):
        DeviceEfficiency(volumes=(KernelVolume(volume=2e6, kernels={"norm": kernel}),
                                  KernelVolume(volume=1e6, kernels={"norm": kernel})))
    with pytest.raises(ValidationError, match="same kernel kinds"):
        DeviceEfficiency(volumes=(KernelVolume(volume=1e6, kernels={"norm": kernel}),
                                  KernelVolume(volume=2e6, kernels={"rope": kernel})))


def test_volume_scales_are_each_kinds_time_against_the_reference_flush():
    from simulator.calibrate.host import Points, _ops_at, fit_volumes
    from simulator.specs.loader import load_device

    device = load_device("hardware_specs/local/epyc-2core-pack.yaml")
    points = Points()
    for flush, factor in ((0.25, 0.5), (1.0, 1.0), (4.0, 3.0)):
        for tokens in (1, 16, 256):
            ops = _ops_at(tokens)
            points.add(ops["input_norm"], factor * 1e-3 * tokens ** 0.5, tokens=tokens, flush=flush)
            points.add(ops["rope"], 2e-4, tokens=tokens, flush=flush)
    volumes, info = fit_volumes(device, points)
    assert [v.volume for v in volumes] == [f * device.cache for f in (0.25, 1.0, 4.0)]
    assert info["scales"]["1"] == {"norm": 1.0, "rope": 1.0}
    assert info["scales"]["4"]["rope"] == pytest.approx(1.0)
    # The fitted overhead is taken off first, so busy time scales a little more than the total.
    assert 0.3 < info["scales"]["0.25"]["norm"] < 0.5 and 3.0 < info["scales"]["4"]["norm"] < 3.5
    assert fit_volumes(device, points.where(lambda raw: raw["flush"] == 1.0)) == ((), {})


def test_a_tied_head_reads_the_embedding_table_at_the_transposed_rate():
    import simulator
    from simulator.calibrate.host import with_transposed
    from simulator.specs.loader import load_device, load_model

    base = load_device("hardware_specs/local/epyc-2core-pack.yaml")
    slow = with_transposed(base, {"transposed_bandwidth": 0.5})
    options = dict(batch=4, input_len=64, output_len=4, weight_dtype="fp32", kv_dtype="fp32",
                   act_dtype="fp32", attention="naive")
    assert load_model("opt-125m").tie_word_embeddings and not load_model("tiny-dense-58m").tie_word_embeddings
    for model, tied in (("opt-125m", True), ("tiny-dense-58m", False)):
        head = {d.efficiency.gemm.transposed_bandwidth: {r["op"]: r for r in simulator.estimate(
            model, d, **options).decode.op_rows()}["lm_head"] for d in (base, slow)}
        assert head[0.5]["memory_s"] == pytest.approx(head[1.0]["memory_s"] * (2.0 if tied else 1.0))


def test_moe_routing_is_its_own_kernel_kind_and_calibration_rebuilds_its_points():
    from simulator.calibrate.host import Points, _routing_op, points_from_raw

    op = _routing_op(16, 64, 6)
    assert op.name == "topk_gate" and op.kind == "routing"
    assert op.read_bytes == 16 * 64 * 4
    points = Points()
    points.add(op, 1e-4, tokens=16, experts=64, top_k=6, flush=1.0)
    again = points_from_raw(points.raw)
    assert again.ops == points.ops and again.raw == points.raw


def test_validation_reports_how_far_the_machine_ran_from_its_calibration():
    from simulator.specs.loader import load_device
    from validation.compare import machine_speed, speed_line

    spec = "hardware_specs/local/epyc-2core-pack.yaml"
    calibrated = load_device(spec).efficiency.fit["measured_peak_flops"] / 1e9
    frame = pd.DataFrame({"host_gflops": [0.7 * calibrated, 0.8 * calibrated, 0.9 * calibrated]})
    speed = machine_speed(frame, spec)
    assert speed["ratio"] == pytest.approx(0.8)
    assert "-20%" in speed_line(speed) and "calibrate anew" in speed_line(speed)
    near = machine_speed(frame.assign(host_gflops=calibrated * 1.05), spec)
    assert "calibrate anew" not in speed_line(near)
    assert machine_speed(pd.DataFrame({"case": ["a"]}), spec) is None  # files from before the probe


def test_experts_looped_one_by_one_do_not_share_waves():
    from simulator.cost.roofline import cost_op
    from simulator.graph.ops import gemm
    from simulator.specs.loader import load_device

    looped = load_device("hardware_specs/local/epyc-2core-0825.yaml")
    assert looped.efficiency.expert_loop
    fused = looped.efficiency.model_copy(update={"expert_loop": False})
    grouped = looped.model_copy(update={"efficiency": fused})

    def op(groups: float):
        return gemm("experts_up_proj", 3.0 * groups, 768, 512, weight_bytes_per_value=4, act_bytes=4,
                    dtype="fp32", groups=groups, weight_values=groups * 768 * 512)

    one = cost_op(op(1.0), looped).compute_s
    assert cost_op(op(10.0), looped).compute_s == pytest.approx(10 * one)
    # A grouped kernel packs the ten experts' tiles into shared waves over the two cores.
    assert cost_op(op(10.0), grouped).compute_s < 10 * cost_op(op(1.0), grouped).compute_s
