"""The executor's real serving loop: the ragged step, the schedulers, the records, the workloads, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from simulator.cli import main
from simulator.engine.records import ITERATION_COLUMNS, REQUEST_COLUMNS
from simulator.errors import InferSimError
from simulator.specs.loader import load_model
from simulator.specs.model import ModelSpec
from validation.executor import Transformer, init_weights, make_backend
from validation.executor.serve import Request, ServeConfig, poisson_requests, serve, trace_requests

TINY = ModelSpec.model_validate({
    "name": "serve-tiny", "architecture": "LlamaForCausalLM", "num_layers": 2, "hidden_size": 64,
    "num_attention_heads": 4, "num_kv_heads": 2, "head_dim": 16,
    "ffn": {"intermediate_size": 96, "activation": "silu", "gated": True}, "vocab_size": 211,
    "max_position_embeddings": 256,
})


def shipped(name: str, **changes) -> ModelSpec:
    """A shipped executor model cut to two layers and a small vocabulary (the same layer shapes)."""
    return ModelSpec.model_validate({**load_model(name).model_dump(exclude_none=True),
                                     "num_layers": 2, "vocab_size": 1024, **changes})


RAGGED_MODELS = {
    "tiny-dense-58m": lambda: shipped("tiny-dense-58m"),
    "tiny-moe-140m": lambda: shipped("tiny-moe-140m"),
    "learned-positions-sliding-window": lambda: ModelSpec.model_validate({
        **TINY.model_dump(exclude_none=True), "norm": "layernorm", "position_encoding": "learned",
        "sliding_window": 5, "qkv_bias": True}),
}


@pytest.mark.parametrize("name", sorted(RAGGED_MODELS))
def test_ragged_step_equals_each_request_run_alone(name):
    model = RAGGED_MODELS[name]()
    rt = Transformer(model, make_backend("numpy"), init_weights(model, 0))
    rng = np.random.default_rng(0)
    # (tokens already cached, new tokens, emits): a whole prompt, a decode, a chunk that ends its
    # prompt, a chunk in the middle of one (no logits), another decode.
    shapes = [(0, 9, True), (12, 1, True), (6, 4, True), (3, 5, False), (7, 1, True)]
    ragged, alone, expected = [], [], []
    for cached, new, emits in shapes:
        seq = rng.integers(0, model.vocab_size, cached + new)
        caches = [rt.new_cache(1, 16), rt.new_cache(1, 16)]
        for cache in caches:
            if cached:
                rt.forward(seq[None, :cached], 0, cache)
        logits = rt.forward(seq[None, cached:], cached, caches[1])
        if emits:
            expected.append(logits[0])
        ragged.append((seq[cached:], cached, caches[0]))
        alone.append(caches[1])
    out = rt.forward_ragged([r[0] for r in ragged], [r[1] for r in ragged], [r[2] for r in ragged],
                            [s[2] for s in shapes])
    expected = np.stack(expected)
    assert out.shape == expected.shape
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5 * scale)
    for (_, _, cache), cache_alone in zip(ragged, alone, strict=True):  # the same keys and values cached
        for a, b in zip(cache.k + cache.v, cache_alone.k + cache_alone.v, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(np.abs(b).max(), 1e-6))
    assert rt.forward_ragged([np.arange(3)], [0], [rt.new_cache(1, 4)], [False]) is None


def check_records(records, requests):
    """Every request once, with all its tokens, in order; the iterations add up to the requests."""
    req, it = records.requests, records.iterations
    assert list(req.columns[:len(REQUEST_COLUMNS)]) == list(REQUEST_COLUMNS) and "tbt_max_s" in req
    assert list(it.columns[:len(ITERATION_COLUMNS)]) == list(ITERATION_COLUMNS)
    assert req["request_id"].tolist() == sorted(r.request_id for r in requests)
    assert len(records.completed) == len(requests)
    by_id = {r.request_id: r for r in requests}
    assert req["prompt_tokens"].tolist() == [by_id[i].prompt_tokens for i in req["request_id"]]
    assert req["output_tokens"].tolist() == [by_id[i].output_tokens for i in req["request_id"]]
    assert (req["scheduled_s"] >= req["arrival_s"]).all()
    assert (req["first_token_s"] > req["scheduled_s"]).all()
    assert (req["first_token_s"] >= req["arrival_s"]).all()
    assert (req["completion_s"] >= req["first_token_s"]).all()
    prompts = sum(r.prompt_tokens for r in requests)
    decodes = sum(r.output_tokens - 1 for r in requests)
    assert it["prefill_tokens"].sum() == prompts
    assert it["decode_tokens"].sum() == it["decode_requests"].sum() == decodes
    assert len(records.token_gaps_s) == decodes and (records.token_gaps_s > 0).all()
    # The gaps tile each request's decode phase: they add up to completion - first token.
    assert records.token_gaps_s.sum() == pytest.approx((req["completion_s"] - req["first_token_s"]).sum())
    one = req["output_tokens"] == 1
    assert req.loc[one, "tbt_max_s"].isna().all()
    assert (req.loc[~one, "tbt_max_s"] > 0).all()
    assert (it["end_s"] > it["start_s"]).all() and (it["start_s"].diff().dropna() > 0).all()
    assert (it["kv_blocks_used"] <= it["kv_blocks_total"]).all()
    assert (it["power_w"] == 0.0).all() and records.meta["power_measured"] is False
    summary = records.summary()
    assert summary["completed"] == len(requests) and summary["energy_j_per_token"] == 0.0


WORKLOAD = poisson_requests(300.0, 14, (2, 24), (1, 6), seed=4)


def test_continuous_admits_whole_prompts_with_prefill_priority():
    config = ServeConfig("continuous", max_batch=3, max_batch_tokens=40)
    records = serve(TINY, WORKLOAD, config)
    check_records(records, WORKLOAD)
    it = records.iterations
    prefill = it["prefill_requests"] > 0
    assert (it.loc[prefill, "decode_requests"] == 0).all()  # prefill iterations carry no decodes
    assert (it["prefill_tokens"] <= 40).all() and (it["decode_requests"] <= 3).all()
    assert it.loc[prefill, "prefill_requests"].sum() == len(WORKLOAD)  # each prompt in one piece


def test_chunked_never_exceeds_its_budget_and_splits_prompts():
    records = serve(TINY, WORKLOAD, ServeConfig("chunked", max_batch=4, chunk_size=8))
    check_records(records, WORKLOAD)
    it = records.iterations
    assert (it["prefill_tokens"] + it["decode_tokens"] <= 8).all()
    assert it["prefill_requests"].sum() > len(WORKLOAD)  # prompts over 8 tokens took several chunks
    assert ((it["prefill_requests"] > 0) & (it["decode_requests"] > 0)).any()  # mixed iterations
    capped = serve(TINY, WORKLOAD[:4], ServeConfig("chunked", chunk_size=16, max_batch_tokens=5))
    assert (capped.iterations["prefill_tokens"] + capped.iterations["decode_tokens"] <= 5).all()


def test_kv_capacity_delays_admission():
    requests = [Request(i, 0.0, 10, 4) for i in range(3)]
    records = serve(TINY, requests, ServeConfig("continuous", kv_capacity_tokens=20))
    check_records(records, requests)
    req = records.requests
    # One request's reservation (14 tokens) at a time: each starts when the previous completes.
    assert (req["scheduled_s"].to_numpy()[1:] >= req["completion_s"].to_numpy()[:-1]).all()
    assert (records.iterations["kv_blocks_used"] <= 14).all()
    assert (records.iterations["kv_blocks_total"] == 20).all()


def test_an_idle_loop_sleeps_until_the_next_arrival():
    requests = [Request(0, 0.0, 6, 3), Request(1, 0.15, 6, 3)]
    records = serve(TINY, requests, ServeConfig("chunked"))
    check_records(records, requests)
    it = records.iterations
    assert len(it) == 6  # a prefill and two decodes each; nothing in between
    assert (it["start_s"].iloc[3:] >= 0.15).all()
    assert records.requests["scheduled_s"].iloc[1] >= 0.15


def test_poisson_workload_is_reproducible_and_within_its_ranges():
    a = poisson_requests(5.0, 50, (4, 9), 7, seed=11)
    assert a == poisson_requests(5.0, 50, (4, 9), 7, seed=11)
    assert a != poisson_requests(5.0, 50, (4, 9), 7, seed=12)
    arrivals = np.array([r.arrival_s for r in a])
    assert arrivals[0] == 0.0 and (np.diff(arrivals) > 0).all()
    assert 0.1 < np.diff(arrivals).mean() < 0.4  # mean gap 1 / rate = 0.2 s
    assert {r.prompt_tokens for r in a} <= set(range(4, 10)) and len({r.prompt_tokens for r in a}) > 1
    assert {r.output_tokens for r in a} == {7}
    with pytest.raises(InferSimError, match="--rate"):
        poisson_requests(0.0, 5, 4, 4)
    with pytest.raises(InferSimError, match="--input-len"):
        poisson_requests(1.0, 5, (9, 4), 4)


def test_trace_workload_is_cut_shifted_and_scaled(tmp_path):
    path = tmp_path / "trace.csv"
    pd.DataFrame({"arrived_at": [10.0, 10.5, 12.0, 13.0], "num_prefill_tokens": [400, 30, 2000, 7],
                  "num_decode_tokens": [20, 3, 90, 1]}).to_csv(path, index=False)
    requests = trace_requests(path, max_requests=3, time_scale=2.0, length_scale=0.1,
                              max_input_len=64, max_output_len=5)
    assert [r.arrival_s for r in requests] == [0.0, 1.0, 4.0]
    assert [r.prompt_tokens for r in requests] == [40, 3, 64]
    assert [r.output_tokens for r in requests] == [2, 1, 5]
    bad = tmp_path / "bad.csv"
    bad.write_text("arrived_at,prompt\n0,3\n")
    with pytest.raises(InferSimError, match="num_prefill_tokens"):
        trace_requests(bad)


def test_requests_the_model_or_limits_cannot_take_are_one_line_errors():
    with pytest.raises(InferSimError, match="max-input-len"):
        serve(TINY, [Request(0, 0.0, 250, 10)])
    with pytest.raises(InferSimError, match="--max-batch-tokens 8"):
        serve(TINY, [Request(0, 0.0, 9, 1)], ServeConfig("continuous", max_batch_tokens=8))
    with pytest.raises(InferSimError, match="--kv-capacity-tokens"):
        serve(TINY, [Request(0, 0.0, 9, 4)], ServeConfig("chunked", kv_capacity_tokens=12))
    with pytest.raises(InferSimError, match="--scheduler"):
        serve(TINY, [Request(0, 0.0, 9, 4)], ServeConfig("fifo"))


def test_cli_json_and_record_files(tmp_path, capsys):
    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(TINY.model_dump(exclude_none=True)))
    records, iterations = tmp_path / "requests.csv", tmp_path / "iterations.csv"
    assert main(["execute-serve", "--model", str(model), "--rate", "200", "--requests", "6",
                 "--input-len", "4:12", "--output-len", "3", "--scheduler", "chunked", "--chunk-size", "8",
                 "--json", "--records-out", str(records), "--iterations-out", str(iterations)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["completed"] == 6 and report["wall_s"] > 0
    assert {"ttft_s", "tbt_s", "e2e_s", "throughput_tokens_per_s", "makespan_s"} <= set(report)
    assert report["meta"]["scheduler"] == "chunked" and report["meta"]["power_measured"] is False
    assert len(pd.read_csv(records)) == 6
    assert pd.read_csv(iterations)["decode_tokens"].sum() == 6 * 2


@pytest.mark.parametrize("args, flag", [
    (["--rate", "0"], "--rate"),
    (["--input-len", "5000"], "--input-len"),
    (["--trace", "missing.csv", "--rate", "2"], "--rate"),
    (["--time-scale", "2"], "--time-scale"),
    (["--scheduler", "chunked", "--chunk-size", "0"], "--chunk-size"),
])
def test_cli_bad_flags_exit_2_with_one_line(args, flag, capsys):
    assert main(["execute-serve", "--model", "tiny-dense-58m", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("infersim: error:") and flag in err
