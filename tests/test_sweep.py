"""Sweeps: the arrays reproduce single estimates row by row; bad sweep files name file and field."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import simulator
from simulator.cli import main
from simulator.errors import InferSimError, SpecError
from simulator.study.options import load_sweep

ROOT = Path(__file__).resolve().parents[1]
CPU_HOST = str(ROOT / "hardware_specs" / "local" / "epyc-2core.yaml")
MODELS = ["llama-2-7b", "llama-3.1-8b", "mistral-7b", "opt-6.7b", "mixtral-8x7b", "deepseek-v2-lite",
          "qwen3-30b-a3b", "tiny-dense-58m"]
PLANS = [{}, {"tp": 2}, {"tp": 4, "pp": 2}, {"dp": 2}, {"tp": 2, "dp": 2, "overlap": "partial"},
         {"pp": 2, "micro_batches": 4, "pp_schedule": "gpipe"}, {"tp": 8, "sequence_parallel": True},
         {"tp": 3}, {"pp": 2, "micro_batches": 3}]


def assert_same_rows(fast: pd.DataFrame, reference: pd.DataFrame) -> None:
    """Every column equal: numbers to floating-point rounding, everything else exactly."""
    assert list(fast.columns) == list(reference.columns)
    assert len(fast) == len(reference)
    for name in fast.columns:
        a, b = fast[name], reference[name]
        numeric = [pd.api.types.is_float_dtype(c) or pd.api.types.is_integer_dtype(c) for c in (a, b)]
        if any(numeric) and not pd.api.types.is_bool_dtype(a):
            a, b = a.astype(float).to_numpy(), b.astype(float).to_numpy()
            assert np.allclose(a, b, rtol=1e-12, atol=0.0, equal_nan=True), (name, a, b)
        else:
            same = [(x == y) or (pd.isna(x) and pd.isna(y)) for x, y in zip(a, b, strict=True)]
            assert all(same), (name, a[~np.array(same)].tolist(), b[~np.array(same)].tolist())


lengths = st.lists(st.integers(1, 4096), min_size=1, max_size=3, unique=True)
outputs = st.lists(st.one_of(st.integers(1, 20), st.integers(21, 1024)), min_size=1, max_size=3, unique=True)


@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(MODELS),
       hardware=st.sampled_from(["a100-80gb-sxm", "h100-sxm", "l4", "t4", "mi300x"]),
       weight_dtype=st.sampled_from(["bf16", "fp8", "int8", "int4", "fp32"]),
       kv_dtype=st.sampled_from([None, "fp8", "int4", "int2", "bf16"]),
       act_dtype=st.sampled_from(["bf16", "fp16"]),
       attention=st.sampled_from(["flash", "naive"]),
       batch=st.lists(st.integers(1, 512), min_size=1, max_size=3, unique=True),
       input_len=lengths, output_len=outputs)
def test_arrays_equal_single_estimates(model, hardware, weight_dtype, kv_dtype, act_dtype, attention,
                                       batch, input_len, output_len):
    axes = {"model": model, "hardware": hardware, "weight_dtype": weight_dtype, "kv_dtype": kv_dtype,
            "act_dtype": act_dtype, "attention": attention, "batch": batch, "input_len": input_len,
            "output_len": output_len}
    assert_same_rows(simulator.sweep(axes), simulator.sweep(axes, fast=False))


@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(MODELS[:4] + ["llama-2-70b", "tiny-dense-58m"]),
       plan=st.sampled_from(PLANS),
       weight_dtype=st.sampled_from(["bf16", "fp8", "int4"]),
       attention=st.sampled_from(["flash", "naive"]),
       batch=st.lists(st.integers(1, 256), min_size=1, max_size=3, unique=True),
       input_len=lengths, output_len=outputs)
def test_parallel_plans_equal_single_estimates(model, plan, weight_dtype, attention, batch, input_len,
                                               output_len):
    axes = {"model": model, "hardware": "dgx-h100", "weight_dtype": weight_dtype, "attention": attention,
            "batch": batch, "input_len": input_len, "output_len": output_len, **plan}
    assert_same_rows(simulator.sweep(axes), simulator.sweep(axes, fast=False))


def test_a_cpu_host_under_a_plan_runs_as_workers():
    axes = {"model": "tiny-dense-58m", "hardware": CPU_HOST, "tp": [1, 2], "pp": [1, 2],
            "batch": [1, 2, 3, 8], "input_len": [16, 100], "output_len": [1, 9, 40]}
    assert_same_rows(simulator.sweep(axes), simulator.sweep(axes, fast=False))


def test_infeasible_configurations_are_rows_with_a_reason():
    frame = simulator.sweep({"model": "llama-2-70b", "hardware": ["h100-sxm", "dgx-h100"], "tp": [1, 3, 8],
                             "batch": [1, 3, 64], "input_len": 4096, "output_len": 256})
    assert len(frame) == 18
    single = frame[(frame.hardware == "h100-sxm") & (frame.tp == 1)]
    assert not single.feasible.any() and single.reason.str.contains("GB per device|GB on").all()
    assert (single.memory_bytes_total > single.memory_bytes_capacity).all()  # the numbers stay
    odd = frame[frame.tp == 3]
    assert not odd.feasible.any() and odd.reason.str.contains("does not divide").all()
    assert odd.ttft_s.isna().all()
    fits = frame[(frame.hardware == "dgx-h100") & (frame.tp == 8) & (frame.batch <= 3)]
    assert fits.feasible.all() and fits.reason.isna().all()


def test_strategies_go_through_single_estimates():
    frame = simulator.sweep({"model": "llama-2-13b", "hardware": "workstation-4090",
                             "offload_weights": ["host=0.5", "host=0.8"], "kv_policy": ["full", "h2o"],
                             "kv_budget": [None, 0.2], "batch": [1, 4], "output_len": 32})
    assert len(frame) == 16
    # h2o needs a budget; a budget needs a policy: those rows say so
    assert frame[(frame.kv_policy == "h2o") & frame.kv_budget.isna()].reason.str.contains("kv-budget").all()
    evicting = frame[(frame.kv_policy == "h2o") & frame.kv_budget.notna()]
    assert evicting.feasible.all() and (evicting.strategy_kv_policy_kind == "h2o").all()
    single = simulator.estimate("llama-2-13b", "workstation-4090", batch=4, output_len=32,
                                offload=simulator.OffloadPlan(weights_host=0.8))
    row = frame[(frame.offload_weights == "host=0.8") & (frame.kv_policy == "full") & frame.kv_budget.isna()
                & (frame.batch == 4)].iloc[0]
    assert row.tpot_s == single.tpot_s
    assert row.memory_bytes_tiers_host_used == single.memory.tiers["host"].used


def test_speculation_and_rows():
    rows = [{"model": "llama-2-13b", "hardware": "h100-sxm", "batch": 4},
            {"model": "llama-2-13b", "hardware": "h100-sxm", "batch": 4, "draft_model": "tiny-dense-58m",
             "spec_gamma": 4, "spec_alpha": 0.8}]
    frame = simulator.sweep(rows=rows)
    plain, spec = frame.iloc[0], frame.iloc[1]
    assert spec.tpot_s == pytest.approx(spec.strategy_speculative_time_per_token_s)
    assert spec.strategy_speculative_plain_tpot_s == pytest.approx(plain.tpot_s)


def test_ranges_and_log2():
    frame = simulator.sweep({"batch": {"range": [1, 9], "step": 4}, "input_len": {"log2": [100, 1024]},
                             "output_len": 2, "spec_alpha": {"range": [0.5, 0.7], "step": 0.1}})
    assert sorted(set(frame.batch)) == [1, 5, 9]
    assert sorted(set(frame.input_len)) == [128, 256, 512, 1024]
    assert sorted(set(frame.spec_alpha)) == [0.5, 0.6, 0.7]
    assert len(frame) == 36 and frame.batch.iloc[0] == 1 and frame.batch.iloc[-1] == 9


@pytest.mark.parametrize(("text", "field", "fragment"), [
    ("axes: {batchsize: [1, 2]}", "axes.batchsize", "unknown option"),
    ("axes: {batch: {range: [8, 1]}}", "axes.batch", "lo is above hi"),
    ("axes: {batch: {range: [1]}}", "axes.batch", "needs [lo, hi]"),
    ("axes: {batch: {ramge: [1, 4]}}", "axes.batch", "a mapping is"),
    ("axes: {batch: {log2: [3, 3]}}", "axes.batch", "no power of two"),
    ("axes: {spec_alpha: {range: [0.1, 0.9]}}", "axes.spec_alpha", "needs a step"),
    ("axes: {model: [llama-2-7b, llama-9-7b]}", "axes.model[1]", "unknown models name"),
    ("axes: {hardware: h100}", "axes.hardware", "unknown hardware name"),
    ("axes: {weight_dtype: [bf16, int3]}", "axes.weight_dtype[1]", "is not one of"),
    ("axes: {batch: [0, 4]}", "axes.batch[0]", "at least 1"),
    ("axes: {tp: [1.5]}", "axes.tp", "whole number"),
    ("axes: {batch: []}", "axes.batch", "at least one value"),
    ("axis: {batch: [1]}", "axis", "unknown field"),
    ("rows: [{batch: 1, moddel: x}]", "rows.moddel", "unknown option"),
    ("name: empty", None, "give axes"),
])
def test_bad_sweep_files_name_file_and_field(tmp_path, capsys, text, field, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(SpecError) as err:
        load_sweep(path)
    assert err.value.source == str(path) and err.value.field == field
    assert fragment in err.value.message
    assert main(["sweep", str(path), "--out", str(tmp_path / "out.csv")]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and str(path) in message and fragment in message


def test_the_example_sweep_file_runs(tmp_path, capsys):
    example = ROOT / "workloads" / "sweeps" / "llama-a100-h100.yaml"
    out = tmp_path / "study.parquet"
    assert main(["sweep", str(example), "--out", str(out), "--json"]) == 0
    frame = pd.read_parquet(out)
    configs = load_sweep(example)
    assert len(frame) == len(configs) > 1000
    assert {"ttft_s", "tpot_s", "throughput_tokens_per_s", "feasible", "reason"} <= set(frame.columns)
    assert frame.feasible.any() and not frame.feasible.all()
    csv = tmp_path / "study.csv"
    assert main(["sweep", str(example), "--out", str(csv)]) == 0
    assert len(pd.read_csv(csv)) == len(frame)


SMALL = {"model": ["llama-2-7b", "mixtral-8x7b"], "hardware": "dgx-h100", "tp": [1, 2],
         "kv_policy": ["full", "window"], "kv_budget": [None, 512], "batch": [1, 7, 64],
         "input_len": [100, 3000], "output_len": [1, 200]}


def test_chunks_resume_where_they_stopped(tmp_path, monkeypatch):
    from simulator.study import cluster

    whole = simulator.sweep(SMALL)
    folder = tmp_path / "chunks"
    first = simulator.sweep(SMALL, chunks=folder, chunk_size=50)
    pd.testing.assert_frame_equal(first, whole)
    files = sorted(folder.glob("chunk-*.parquet"))
    assert len(files) == -(-len(whole) // 50)
    for path in files[1::2]:  # an interrupted study: every other chunk missing
        path.unlink()
    calls = []
    original = cluster.evaluate_chunk
    monkeypatch.setattr(cluster, "evaluate_chunk",
                        lambda configs, fast: calls.append(1) or original(configs, fast))
    resumed = simulator.sweep(SMALL, chunks=folder, chunk_size=50)
    assert len(calls) == len(files[1::2])
    pd.testing.assert_frame_equal(resumed, whole)
    with pytest.raises(InferSimError, match="another sweep"):
        simulator.sweep({**SMALL, "batch": [2]}, chunks=folder, chunk_size=50)


def test_dask_local_cluster_equals_the_local_sweep(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    whole = simulator.sweep(SMALL)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        spread = simulator.sweep(SMALL, scheduler=client, chunk_size=40, chunks=tmp_path / "chunks")
    pd.testing.assert_frame_equal(spread, whole)
