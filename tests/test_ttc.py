"""Test-time compute workloads: N parallel samples per prompt (best-of-N, self-consistency) and
long outputs. One prefill per request, ``batch * samples`` decode streams, a KV cache holding the
prompt once and every sample's generated tokens (docs/model.md, test-time compute)."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import simulator
from simulator.cli import main
from simulator.cost.roofline import cost_ops
from simulator.errors import InferSimError, SpecError
from simulator.estimate import _phase, resolve_precision
from simulator.graph.transformer import StepShape, build_step, decode_contexts, kv_bytes_per_token
from simulator.scenario import run_scenario
from simulator.specs.loader import load_model, load_system
from simulator.strategies.kv import KVPolicy
from simulator.strategies.parallel import ParallelPlan
from simulator.strategies.speculative import Speculation
from simulator.study.options import load_sweep

sys.path.insert(0, str(Path(__file__).parent))
from test_sweep import assert_same_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _shape(batch=2, input_len=700, output_len=300):
    return {"batch": batch, "input_len": input_len, "output_len": output_len}


# --- samples = 1 is the estimate as it was -----------------------------------------------------

@pytest.mark.parametrize(("model", "options"), [
    ("llama-2-7b", {}),
    ("mistral-7b", {"input_len": 5000}),                      # a sliding window
    ("deepseek-v2-lite", {}),                                  # MLA
    ("llama-2-7b", {"kv_dtype": "int2", "kv_residual": 128}),  # KIVI
    ("llama-2-7b", {"kv_policy": KVPolicy("h2o", 0.2)}),
])
def test_one_sample_is_the_plain_request_shape(model, options):
    shape = {**_shape(), **options}
    result = simulator.estimate(model, "h100-sxm", samples=1, **shape)
    assert result.to_dict() == simulator.estimate(model, "h100-sxm", **shape).to_dict()
    # The expressions the estimate had before samples: decode a batch of `batch` sequences,
    # hold `input + output - 1` tokens each, count `batch * output` tokens.
    spec, device = load_model(model), load_system("h100-sxm").device
    precision = result.precision
    contexts = decode_contexts(shape["input_len"], shape["output_len"])
    kept = (options["kv_policy"].decode_model(spec, shape["input_len"], shape["output_len"])
            if "kv_policy" in options else spec)
    if "kv_policy" not in options:
        decode = _phase("decode", cost_ops(build_step(kept, StepShape("decode", shape["batch"], 1, contexts),
                                                      precision), device))
        assert result.tpot_s == decode.time_s
    tokens = kept.cached_tokens(shape["input_len"] + shape["output_len"] - 1)
    kv = shape["batch"] * tokens * kv_bytes_per_token(spec, precision.kv, precision.group_size)
    if "kv_residual" in options:
        extra = spec.kv_elements_per_token() * (precision.act_bytes - precision.kv_bytes)
        kv += shape["batch"] * min(tokens, options["kv_residual"]) * extra
    assert result.memory.kv_cache == kv
    assert result.output_tokens == shape["batch"] * shape["output_len"]
    assert result.throughput_tokens_per_s == shape["batch"] * shape["output_len"] / result.e2e_s
    assert result.energy_j_per_request == result.energy_j / shape["batch"]


# --- the shape of N samples --------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(model=st.sampled_from(["llama-3.1-8b", "mistral-7b", "deepseek-v2-lite", "opt-6.7b"]),
       batch=st.integers(1, 8), samples=st.integers(1, 64), input_len=st.integers(1, 6000),
       output_len=st.integers(1, 6000), kv_dtype=st.sampled_from([None, "fp8", "int4"]))
def test_kv_memory_holds_the_prompt_once_and_every_sample(model, batch, samples, input_len, output_len,
                                                          kv_dtype):
    result = simulator.estimate(model, "h100-sxm", batch=batch, input_len=input_len, output_len=output_len,
                                samples=samples, kv_dtype=kv_dtype, check_memory=False)
    spec = load_model(model)
    per_token = kv_bytes_per_token(spec, result.precision.kv, result.precision.group_size)
    generated = output_len - 1  # the last token is sampled, never fed back
    if spec.sliding_window is None:
        expected = batch * (input_len + samples * generated) * per_token
    else:  # each sample keeps its last `window` tokens, its own first
        kept = min(input_len + generated, spec.sliding_window)
        own = min(kept, generated)
        expected = batch * ((kept - own) + samples * own) * per_token
    assert result.memory.kv_cache == pytest.approx(expected, rel=1e-12)
    if spec.sliding_window is None:
        one = simulator.estimate(model, "h100-sxm", batch=batch, input_len=input_len, output_len=output_len,
                                 kv_dtype=kv_dtype, check_memory=False)
        assert result.memory.kv_cache - one.memory.kv_cache == pytest.approx(
            batch * (samples - 1) * generated * per_token, rel=1e-9, abs=1e-6)


def test_decode_is_a_batch_of_streams_and_prefill_runs_once():
    shape = _shape(batch=3, input_len=2048, output_len=1024)
    plain = simulator.estimate("llama-3.1-8b", "h100-sxm", **shape)
    tpots = []
    for n in (1, 2, 4, 8, 16, 64):
        result = simulator.estimate("llama-3.1-8b", "h100-sxm", samples=n, **shape)
        assert result.ttft_s == plain.ttft_s and result.prefill.energy_j == plain.prefill.energy_j
        # the decode step of N samples is the decode step of batch x N sequences
        wide = simulator.estimate("llama-3.1-8b", "h100-sxm", **{**shape, "batch": 3 * n}, check_memory=False)
        assert result.tpot_s == wide.tpot_s
        # each stream reads its whole context: the prefix is read once per sample
        reads = result.ops_frame().query("phase == 'decode' and op == 'attention'").kv_bytes.iloc[0]
        assert reads == pytest.approx(n * plain.ops_frame().query(
            "phase == 'decode' and op == 'attention'").kv_bytes.iloc[0], rel=1e-12)
        assert result.output_tokens == 3 * n * 1024
        assert result.throughput_tokens_per_s == pytest.approx(3 * n * 1024 / result.e2e_s, rel=1e-12)
        tpots.append(result.tpot_s)
    assert all(b > a for a, b in zip(tpots, tpots[1:], strict=False))
    # ... while a prefill of batch x N prompts would cost more than the one shared prefill
    assert simulator.estimate("llama-3.1-8b", "h100-sxm", **{**shape, "batch": 24}).ttft_s > plain.ttft_s


def test_long_outputs_integrate_attention_over_the_growing_context():
    # A decode step's attention reads the context it has; the mean over the output is the mean
    # of a linear cost, so the sampled contexts average to input + output / 2 exactly.
    result = simulator.estimate("llama-3.1-8b", "h100-sxm", batch=1, input_len=512, output_len=32768)
    contexts = decode_contexts(512, 32768)
    assert contexts.mean() == pytest.approx(512 + 32768 / 2, rel=1e-12)
    frame = result.ops_frame().query("phase == 'decode' and op == 'attention'")
    spec = load_model("llama-3.1-8b")
    assert frame.kv_bytes.iloc[0] == pytest.approx(contexts.mean() * kv_bytes_per_token(spec, "bf16"),
                                                   rel=1e-12)
    # memory holds the final context
    assert result.memory.kv_cache == (512 + 32767) * kv_bytes_per_token(spec, "bf16")
    shares = []
    for output_len in (1024, 8192, 32768):
        ops = simulator.estimate("llama-3.1-8b", "h100-sxm", batch=8, input_len=512,
                                 output_len=output_len).ops_frame().query("phase == 'decode'")
        shares.append(ops[ops.kind == "attention"].share.sum())
    assert shares[0] < shares[1] < shares[2]


def test_strategies_take_samples():
    shape = _shape()
    spec = Speculation("tiny-dense-58m", 4, 0.8)
    one = simulator.estimate("llama-2-7b", "h100-sxm", speculative=spec, **shape)
    four = simulator.estimate("llama-2-7b", "h100-sxm", speculative=spec, samples=4, **shape)
    assert four.strategy["speculative"]["verify_step_s"] > one.strategy["speculative"]["verify_step_s"]
    assert four.ttft_s == one.ttft_s
    split = simulator.estimate("llama-2-7b", "h100-sxm", prefill_hardware="h100-sxm",
                               decode_hardware="a100-80gb-sxm", kv_link="50 GB/s", samples=4, **shape)
    # the prompt's KV crosses once per request, whatever the samples
    alone = simulator.estimate("llama-2-7b", "h100-sxm", prefill_hardware="h100-sxm",
                               decode_hardware="a100-80gb-sxm", kv_link="50 GB/s", **shape)
    assert (split.strategy["disaggregation"]["kv_transfer"]["bytes"]
            == alone.strategy["disaggregation"]["kv_transfer"]["bytes"])
    assert split.samples == 4 and split.tpot_s > alone.tpot_s
    planned = simulator.estimate("llama-2-70b", "dgx-h100", parallel=ParallelPlan(tp=4, dp=2), samples=8,
                                 **{**shape, "batch": 4})
    assert planned.output_tokens == 4 * 8 * 300


def test_cost_per_request_pays_for_every_sample():
    frame = simulator.sweep({"model": "llama-3.1-8b", "hardware": "h100-sxm", "samples": [1, 8],
                             "batch": [4], "input_len": 512, "output_len": 2048})
    assert list(frame.samples) == [1, 8]
    per_token = frame.cost_usd_per_million_tokens / 1e6
    assert np.allclose(frame.cost_usd_per_request, per_token * frame.samples * frame.output_len, rtol=1e-12)
    assert frame.cost_usd_per_request.iloc[1] > frame.cost_usd_per_request.iloc[0]
    assert frame.cost_usd_per_million_tokens.iloc[1] < frame.cost_usd_per_million_tokens.iloc[0]
    assert np.allclose(frame.energy_j_per_request, frame.energy_j / frame.batch, rtol=1e-12)


# --- sweeps ------------------------------------------------------------------------------------

@settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(model=st.sampled_from(["llama-3.1-8b", "mistral-7b", "mixtral-8x7b", "deepseek-v2-lite"]),
       plan=st.sampled_from([{}, {"tp": 2}, {"dp": 2}, {"tp": 2, "pp": 2}]),
       samples=st.lists(st.integers(1, 64), min_size=1, max_size=3, unique=True),
       batch=st.lists(st.integers(1, 16), min_size=1, max_size=2, unique=True),
       input_len=st.lists(st.integers(1, 4096), min_size=1, max_size=2, unique=True),
       output_len=st.lists(st.integers(1, 2048), min_size=1, max_size=2, unique=True))
def test_sweep_equals_estimate_with_samples(model, plan, samples, batch, input_len, output_len):
    axes = {"model": model, "hardware": "dgx-h100", "samples": samples, "batch": batch,
            "input_len": input_len, "output_len": output_len, **plan}
    fast = simulator.sweep(axes)
    assert fast.attrs["as_arrays"] == len(fast)
    assert_same_rows(fast, simulator.sweep(axes, fast=False))


def test_sweep_rows_with_strategies_take_samples():
    rows = [{"model": "llama-2-7b", "hardware": "h100-sxm", "batch": 2, "samples": 4},
            {"model": "llama-2-7b", "hardware": "h100-sxm", "batch": 2, "samples": 4, "kv_policy": "h2o",
             "kv_budget": 0.2}]
    frame = simulator.sweep(rows=rows)
    single = simulator.estimate("llama-2-7b", "h100-sxm", batch=2, samples=4, kv_policy=KVPolicy("h2o", 0.2))
    assert frame.tpot_s.iloc[1] == single.tpot_s
    assert frame.memory_bytes_kv_cache.iloc[1] == single.memory.kv_cache


def test_the_test_time_compute_sweep_file_runs():
    path = ROOT / "workloads" / "sweeps" / "test-time-compute.yaml"
    configs = load_sweep(path)
    assert {"samples", "output_len", "model"} <= set(configs.columns)
    assert configs.samples.max() >= 64 and configs.output_len.max() >= 32768


# --- scenarios and the CLI ---------------------------------------------------------------------

def test_scenario_workload_takes_samples(tmp_path):
    path = tmp_path / "best-of-8.yaml"
    path.write_text("model: llama-3.1-8b\nhardware: h100-sxm\n"
                    "workload: {batch: 2, input_len: 512, output_len: 4096, samples: 8}\n")
    result = run_scenario(path)
    assert result.samples == 8
    assert result.tpot_s == simulator.estimate("llama-3.1-8b", "h100-sxm", batch=2, input_len=512,
                                               output_len=4096, samples=8).tpot_s


def test_cli_samples_flag(capsys):
    assert main(["estimate", "--model", "llama-3.1-8b", "--samples", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 4 and out["energy_j_per_request"] == pytest.approx(out["energy_j"])


@pytest.mark.parametrize("value", ["0", "-3"])
def test_bad_samples_flag_is_one_line(capsys, value):
    assert main(["estimate", "--samples", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--samples" in err and "positive integer" in err


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "4"])
def test_bad_samples_argument_raises(value):
    with pytest.raises(InferSimError, match="samples"):
        simulator.estimate("llama-2-7b", "h100-sxm", samples=value)


def test_bad_samples_in_a_sweep_or_scenario_names_the_field(tmp_path, capsys):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text("axes: {samples: [4, 0]}\n")
    with pytest.raises(SpecError) as err:
        load_sweep(sweep)
    assert err.value.field == "axes.samples[1]" and "at least 1" in err.value.message
    scenario = tmp_path / "bad-scenario.yaml"
    scenario.write_text("model: llama-2-7b\nhardware: h100-sxm\nworkload: {samples: 0}\n")
    assert main(["run", str(scenario)]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "workload.samples" in message


def test_samples_do_not_change_a_frame_without_them():
    # A sweep that does not name samples has no samples column and the numbers of samples = 1.
    frame = simulator.sweep({"model": "llama-2-7b", "batch": [1, 4]})
    assert "samples" not in frame.columns
    rows = simulator.sweep({"model": "llama-2-7b", "batch": [1, 4], "samples": 1})
    pd.testing.assert_series_equal(frame.tpot_s, rows.tpot_s)
    precision = resolve_precision(load_system("a100-80gb-sxm").device, "bf16", None, "bf16", 128)
    assert rows.kv_dtype.iloc[0] == precision.kv
