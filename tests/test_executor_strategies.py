"""The executor's memory-hierarchy strategies: KV eviction (StreamingLLM, H2O), KIVI-quantized KV,
MoE experts on disk behind a cache; their wiring into execute, the CLI, measure and compare."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from simulator.errors import InferSimError
from simulator.specs.model import ModelSpec
from validation.executor import Transformer, execute, init_weights, make_backend
from validation.executor.kv import Eviction, Quantization, pack, quantize, unpack

BASE = {
    "name": "test-tiny", "architecture": "LlamaForCausalLM", "num_layers": 2, "hidden_size": 64,
    "num_attention_heads": 4, "num_kv_heads": 2, "head_dim": 16,
    "ffn": {"intermediate_size": 96, "activation": "silu", "gated": True}, "vocab_size": 211,
}
DENSE = ModelSpec.model_validate(BASE)
# Value groups of 128 channels are two 64-wide KV heads, as on tiny-dense-58m.
WIDE = ModelSpec.model_validate({**BASE, "name": "test-wide", "head_dim": 64})
MOE = ModelSpec.model_validate({**BASE, "name": "test-moe", "architecture": "MixtralForCausalLM",
                                "moe": {"num_experts": 6, "top_k": 2, "expert_intermediate_size": 48}})


def decode_run(model: ModelSpec, strategy, prompt: int = 24, steps: int = 10, batch: int = 2, check=None):
    """Logits of a prefill and ``steps`` decode steps of fixed tokens; ``check(runtime, cache, position)``
    runs before each decode step."""
    runtime = Transformer(model, make_backend("numpy"), init_weights(model))
    runtime.kv_strategy = strategy
    cache = runtime.new_cache(batch, prompt + steps)
    rng = np.random.default_rng(5)
    logits = [runtime.forward(rng.integers(0, model.vocab_size, (batch, prompt)), 0, cache)]
    for position in range(prompt, prompt + steps):
        if check is not None:
            check(runtime, cache, position)
        logits.append(runtime.forward(rng.integers(0, model.vocab_size, (batch, 1)), position, cache))
        if check is not None:
            check(runtime, cache, position + 1)
    return np.stack(logits), runtime, cache


# --- eviction -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["streaming", "h2o"])
def test_eviction_keeps_exactly_the_budget_and_the_recent_tokens(kind):
    policy = Eviction(kind, 8, sinks=2 if kind == "streaming" else 0)
    attended = []

    def check(runtime, cache, position):
        attended.append(runtime.take_counters().get("kv_keys_attended", 0))
        for layer in range(DENSE.num_layers):
            assert cache.held[layer] == 8
            held = cache.positions[layer]
            assert (held < position).all()  # only tokens already seen
            for row in held.reshape(-1, 8):
                kept = set(row.tolist())
                assert len(kept) == 8  # a position is held once
                assert set(range(position - policy.recent, position)) <= kept
                if kind == "streaming":
                    assert kept == {0, 1} | set(range(position - 6, position))

    decode_run(DENSE, policy, check=check)
    assert max(attended) == 8  # each decode step attends the budget, the new token included


def test_h2o_evicts_the_lowest_scoring_token_outside_the_recent_half():
    policy = Eviction("h2o", 8)
    before = {}

    def check(runtime, cache, position):
        positions, scores = cache.positions[0], cache.scores[0]
        if position in before:  # after the step that wrote `position - 1`
            old_positions, old_scores = before.pop(position)
            older = old_positions <= position - 1 - policy.recent
            lowest = np.where(older, old_scores, np.inf).argmin(-1)
            evicted = np.take_along_axis(old_positions, lowest[..., None], axis=-1)[..., 0]
            for b, h in np.ndindex(evicted.shape):
                assert evicted[b, h] not in positions[b, h]
                assert set(positions[b, h].tolist()) == set(old_positions[b, h].tolist()) - {evicted[b, h]} \
                    | {position - 1}
        else:
            before[position + 1] = (positions.copy(), scores.copy())

    decode_run(DENSE, policy, check=check)


@pytest.mark.parametrize("kind", ["streaming", "h2o"])
def test_a_budget_that_holds_the_context_gives_the_full_caches_logits(kind):
    full, _, _ = decode_run(DENSE, None)
    kept, _, cache = decode_run(DENSE, Eviction(kind, 40, sinks=4 if kind == "streaming" else 0))
    np.testing.assert_allclose(kept, full, rtol=1e-5, atol=1e-6)
    assert cache.k[0].shape[2] == 34  # slots capped at the sequence: nothing is ever evicted
    small, _, _ = decode_run(DENSE, Eviction(kind, 8, sinks=4 if kind == "streaming" else 0))
    np.testing.assert_allclose(small[0], full[0], rtol=1e-5, atol=1e-6)  # prefill sees the whole prompt
    assert not np.allclose(small[1:], full[1:], atol=1e-6)


def test_execute_runs_the_policies_and_reports_them():
    full = execute(DENSE, batch=2, input_len=20, output_len=4, repeats=1)
    h2o = execute(DENSE, batch=2, input_len=20, output_len=4, repeats=1, kv_policy="h2o", kv_budget=8)
    assert h2o.strategy["kv_policy"] == {"kind": "h2o", "budget_tokens": 8, "recent": 4, "heavy_hitters": 4}
    assert h2o.strategy["counters"]["decode"]["kv_keys_attended"] == 8
    assert "h2o_scores" in h2o.ops["decode"] and h2o.memory.kv_cache_bytes < full.memory.kv_cache_bytes
    # A fraction is of the whole sequence, as `infersim estimate --kv-budget 0.5` reads it.
    half = execute(DENSE, batch=1, input_len=20, output_len=4, repeats=1, kv_policy="streaming",
                   kv_budget=0.5, kv_sinks=2)
    assert half.strategy["kv_policy"]["budget_tokens"] == 12
    window = execute(DENSE, batch=1, input_len=20, output_len=4, repeats=1, kv_policy="window", kv_budget=6)
    assert window.output_tokens == execute(DENSE, batch=1, input_len=20, output_len=4, repeats=1,
                                           kv_window=6).output_tokens


# --- quantization -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_codes_pack_and_quantization_error_is_half_a_step(bits):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << bits, (3, 5, 16)).astype(np.uint8)
    assert pack(codes, bits).shape == (3, 5, 16 * bits // 8)
    np.testing.assert_array_equal(unpack(pack(codes, bits), bits), codes)
    x = rng.standard_normal((2, 3, 40, 16)).astype(np.float32)
    q, scale, low = quantize(x, (2,), bits)
    assert q.max() <= (1 << bits) - 1
    assert (np.abs(q * scale + low - x) <= scale / 2 + 1e-6).all()


def test_quantized_cache_dequantizes_what_it_stored():
    quant = Quantization(4, residual=3, group_size=32)
    _, _, cache = decode_run(DENSE, quant, prompt=70, steps=2)
    keys, values = cache.dequantize(0, 3)
    assert keys.shape[2] == 72 and cache.quantized[0] == 69
    # Requantize what was dequantized: the same codes come back (the groups' ranges did not move).
    codes, _, _ = quantize(keys[:, :, :64].reshape(2, 2, 2, 32, 16), (3,), 4)
    np.testing.assert_array_equal(pack(codes.reshape(2, 2, 64, 16), 4), cache.k[0][:, :, :64])


def test_int8_kv_is_close_to_float32_and_int2_further():
    full, _, _ = decode_run(WIDE, None, prompt=150)
    errors = {}
    for bits in (8, 4, 2):
        out, _, cache = decode_run(WIDE, Quantization(bits), prompt=150)
        np.testing.assert_array_equal(out[0], full[0])  # prefill attends in float32
        errors[bits] = np.abs(out[1:] - full[1:]).max()
    scale = np.abs(full).max()
    assert errors[8] < 0.01 * scale and errors[8] < errors[4] < errors[2]
    residual, _, _ = decode_run(WIDE, Quantization(2, residual=200), prompt=150)
    np.testing.assert_allclose(residual, full, rtol=1e-5, atol=1e-6)  # every token still in float32


def test_execute_accounts_the_quantized_cache():
    kv = {}
    for bits in (None, 8, 4, 2):
        result = execute(WIDE, batch=2, input_len=40, output_len=3, repeats=1, kv_bits=bits)
        kv[bits] = result.memory.kv_cache_bytes
    assert kv[2] < kv[4] < kv[8] < kv[None]
    result = execute(WIDE, batch=2, input_len=40, output_len=3, repeats=1, kv_bits=4, kv_residual=8)
    quant = result.strategy["kv_quantization"]
    assert quant["bits"] == 4 and quant["packed"] and quant["residual_tokens"] == 8
    codes = 2 * WIDE.num_layers * 2 * WIDE.kv_heads * (42 - 8) * 64 // 2  # K and V, 4 bits a value
    assert quant["codes_bytes"] == codes
    assert quant["residual_bytes"] == 2 * WIDE.num_layers * 2 * WIDE.kv_heads * 8 * 64 * 4
    parts = quant["codes_bytes"] + quant["scale_bytes"] + quant["residual_bytes"]
    assert result.memory.kv_cache_bytes == parts
    assert {"kv_quantize", "kv_dequantize"} <= set(result.ops["decode"])


# --- experts on disk ----------------------------------------------------------------------------


def test_expert_cache_counts_every_routed_expert_and_reads_the_misses():
    base = execute(MOE, batch=2, input_len=12, output_len=4, repeats=2)
    for fraction in (0.0, 0.5, 1.0):
        run = execute(MOE, batch=2, input_len=12, output_len=4, repeats=2, expert_cache=fraction)
        assert run.output_tokens == base.output_tokens
        info, counters = run.strategy["expert_cache"], run.strategy["counters"]
        assert info["cached_per_layer"] == round(fraction * 6)
        for phase in ("prefill", "decode"):
            c = counters[phase]
            assert c["expert_hits"] + c["expert_misses"] == pytest.approx(
                run.ops[phase]["experts_up_proj"]["kernels"])
            assert c["expert_bytes_read"] == pytest.approx(c["expert_misses"] * info["expert_bytes"])
        if fraction == 0.0:
            assert counters["decode"]["expert_hits"] == 0 and "expert_load" in run.ops["decode"]
        if fraction == 1.0:
            assert counters["decode"]["expert_misses"] == 0 and info["disk_bytes"] == 0
        buffer = info["expert_bytes"] if fraction < 1 else 0  # one expert's read buffer
        assert run.memory.weights_bytes == base.memory.weights_bytes - info["disk_bytes"] + buffer


def test_the_cache_holds_the_most_routed_experts():
    from validation.executor.experts import ExpertStore

    weights = init_weights(MOE)
    store = ExpertStore(weights.layers, 0.5)
    try:
        for number, tokens in ((4, 9), (1, 5), (5, 7), (0, 1)):
            store.expert(0, number, tokens)
        store.choose_popular()
        assert store.describe()["resident"]["0"] == [1, 4, 5]
        np.testing.assert_array_equal(weights.layers[0].moe.experts[5].up, store.resident[0][5].up)
        assert weights.layers[0].moe.experts[2].up.size == 0  # on disk only
    finally:
        store.close()


# --- bad combinations and wiring ----------------------------------------------------------------


@pytest.mark.parametrize("model, kwargs, fragment", [
    (DENSE, {"expert_cache": 0.5}, "mixture-of-experts"),
    (MOE, {"expert_cache": 1.5}, "between 0 and 1"),
    (MOE, {"expert_cache": 0.5, "offload_layers": 1}, "not both"),
    (WIDE, {"kv_bits": 4, "backend": "torch"}, "numpy backend only"),
    (DENSE, {"kv_policy": "h2o", "kv_budget": 8, "backend": "torch"}, "numpy backend only"),
    (WIDE, {"kv_bits": 3}, "int8, int4, int2"),
    (WIDE, {"kv_bits": 4, "kv_policy": "h2o", "kv_budget": 8}, "drop --kv-policy or --kv-dtype"),
    (WIDE, {"kv_residual": 8}, "needs --kv-dtype"),
    (DENSE, {"kv_bits": 4}, "do not tile"),
    (DENSE, {"kv_budget": 8}, "needs an eviction policy"),
    (DENSE, {"kv_policy": "streaming", "kv_budget": 4, "kv_sinks": 4}, "attention sinks"),
    (DENSE, {"kv_policy": "window", "kv_budget": 4, "kv_window": 4}, "one or the other"),
    (DENSE, {"kv_policy": "h2o", "kv_budget": 8, "tp": 2}, "parallel plans"),
])
def test_bad_combinations_are_infersim_errors(model, kwargs, fragment):
    with pytest.raises(InferSimError, match=fragment):
        execute(model, batch=1, input_len=8, output_len=2, repeats=1, **kwargs)


def test_execute_cli_takes_the_estimate_flags(tmp_path, capsys):
    from simulator.cli import main

    paths = {}
    for model in (WIDE, MOE):
        paths[model.name] = tmp_path / f"{model.name}.yaml"
        paths[model.name].write_text(yaml.safe_dump(model.model_dump(mode="json", exclude_none=True)))
    common = ["--input-len", "12", "--output-len", "3", "--repeats", "1", "--json"]
    assert main(["execute", "--model", str(paths["test-wide"]), *common, "--kv-policy", "streaming",
                 "--kv-budget", "0.5", "--kv-sinks", "2"]) == 0
    policy = json.loads(capsys.readouterr().out)["strategy"]["kv_policy"]
    assert policy["budget_tokens"] == 8  # ceil(0.5 * (12 + 3))
    assert main(["execute", "--model", str(paths["test-wide"]), *common, "--kv-dtype", "int2",
                 "--kv-residual", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy"]["kv_quantization"]["bits"] == 2
    assert main(["execute", "--model", str(paths["test-moe"]), *common[:-1], "--expert-cache", "0.5"]) == 0
    assert "expert cache" in capsys.readouterr().out
    assert main(["execute", "--model", str(paths["test-wide"]), "--expert-cache", "0.5"]) == 2
    assert "mixture-of-experts" in capsys.readouterr().err


def test_strategies2_suite_and_its_estimate_options():
    from simulator.strategies.kv import KVPolicy
    from validation.compare import _strategy
    from validation.measure import Case, suite

    assert Case("tiny-dense-58m", 4, 2048, 16, kv_window=128).key == "tiny-dense-58m/b4/p2048/g16/kvwin128"
    cases = suite("strategies2")
    assert 20 <= len(cases) <= 30 and len({c.key for c in cases}) == len(cases)
    keys = {c.key for c in cases}
    assert {"tiny-dense-58m/b4/p2048/g16/kv-h2o128", "tiny-dense-58m/b1/p2048/g16/kv-streaming512-s4",
            "tiny-dense-58m/b4/p1024/g16/kvint2-r128", "tiny-moe-140m/b8/p128/g8/experts0.25"} <= keys
    row = type("Row", (), {"model": "tiny-moe-140m", "kv_policy": "h2o", "kv_budget": 128.0, "kv_sinks": 4,
                           "kv_bits": 4, "kv_residual": 128, "expert_cache": 0.25})()
    options = _strategy(row)
    assert options["kv_policy"] == KVPolicy("h2o", 128.0, 4)
    assert options["kv_dtype"] == "int4" and options["kv_residual"] == 128
    assert options["offload"].expert_cache == 0.25
    none = type("Row", (), {"model": "tiny-dense-58m", "kv_policy": np.nan, "kv_bits": 0,
                            "expert_cache": np.nan})()
    assert _strategy(none) == {}
