"""The reference executor: KV cache, MoE routing, determinism, CLI output, bad input, timings."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import yaml

from simulator.errors import DoesNotFitError, InferSimError, UnsupportedError
from simulator.specs.loader import load_model
from simulator.specs.model import ModelSpec
from validation.executor import Transformer, execute, generate, init_weights, make_backend, prompt_tokens
from validation.executor.cli import add_execute_parser, cmd_execute
from validation.executor.profiler import KernelProfiler

BASE = {
    "name": "test-tiny", "architecture": "LlamaForCausalLM", "num_layers": 2, "hidden_size": 64,
    "num_attention_heads": 4, "num_kv_heads": 2, "head_dim": 16,
    "ffn": {"intermediate_size": 96, "activation": "silu", "gated": True}, "vocab_size": 211,
}
MOE = {"num_experts": 6, "top_k": 2, "expert_intermediate_size": 48}


def spec(**changes) -> ModelSpec:
    return ModelSpec.model_validate({**BASE, **changes})


VARIANTS = {
    "dense-gqa": spec(),
    "mha-sliding-window": spec(num_kv_heads=4, sliding_window=5),
    "opt-like": spec(norm="layernorm", position_encoding="learned", max_position_embeddings=64,
                     ffn={"intermediate_size": 96, "activation": "relu", "gated": False},
                     qkv_bias=True, attention_out_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "qk-norm-gelu": spec(qk_norm=True, ffn={"intermediate_size": 96, "activation": "gelu", "gated": True}),
    "moe-shared": spec(num_layers=3, moe={**MOE, "num_shared_experts": 1, "first_dense_layers": 1,
                                          "router_bias": True}),
    "no-positions-mqa": spec(position_encoding="none", num_kv_heads=1,
                             ffn={"intermediate_size": 96, "activation": "gelu_new", "gated": False}),
}


def runtime(model: ModelSpec, seed: int = 0, profiler: KernelProfiler | None = None) -> Transformer:
    return Transformer(model, make_backend("numpy"), init_weights(model, seed), profiler)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_weights_have_exactly_the_models_parameter_count(name):
    model = VARIANTS[name]
    assert init_weights(model).num_params() == model.params()


def test_shipped_executor_models_are_sized_as_named():
    for name, total in (("tiny-dense-58m", 58e6), ("small-dense-250m", 254e6), ("tiny-moe-140m", 140e6)):
        assert load_model(name).params() == pytest.approx(total, rel=0.01)
    assert init_weights(load_model("tiny-dense-58m")).num_params() == load_model("tiny-dense-58m").params()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_kv_cache_decode_equals_full_recompute(name):
    model = VARIANTS[name]
    rt = runtime(model)
    prompt = prompt_tokens(model.vocab_size, 3, 9, seed=1)
    steps = 6
    cache = rt.new_cache(3, prompt.shape[1] + steps)
    logits = rt.forward(prompt, 0, cache)
    seen = prompt
    for _ in range(steps):
        nxt = np.argmax(logits, axis=-1)[:, None]
        logits = rt.forward(nxt, seen.shape[1], cache)
        seen = np.concatenate([seen, nxt], axis=1)
    # The same sequence in one pass, no cache: attention over this pass's own keys only.
    full = rt.forward(seen, 0, None)
    scale = np.abs(full).max()
    np.testing.assert_allclose(logits, full, rtol=1e-4, atol=1e-5 * scale)


def test_sliding_window_changes_the_output():
    plain, windowed = runtime(spec()), runtime(spec(sliding_window=3))
    prompt = prompt_tokens(BASE["vocab_size"], 1, 12, seed=2)
    assert not np.allclose(plain.forward(prompt, 0, None), windowed.forward(prompt, 0, None))


# --- MoE -------------------------------------------------------------------------------------

class RowCounter(KernelProfiler):
    """Also records how many token rows each expert GEMM multiplied."""

    def __init__(self) -> None:
        super().__init__()
        self.expert_rows: list[int] = []

    def __call__(self, name, fn, *args):
        if name == "experts_up_proj":
            self.expert_rows.append(args[0].shape[0])
        return super().__call__(name, fn, *args)


def test_router_sends_each_token_to_exactly_top_k_experts():
    backend = make_backend("numpy")
    logits = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    experts, gates = backend.route(logits, 2)
    assert experts.shape == (50, 2)
    assert all(len(set(row)) == 2 for row in experts.tolist())
    # The chosen experts are the two largest logits; gates are their softmax.
    np.testing.assert_array_equal(np.sort(experts, axis=1), np.sort(np.argsort(-logits)[:, :2], axis=1))
    chosen = np.take_along_axis(logits, experts, axis=1)
    np.testing.assert_allclose(gates, np.exp(chosen) / np.exp(chosen).sum(1, keepdims=True), rtol=1e-6)
    groups = backend.group_by_expert(experts, gates, 6)
    routed = np.zeros((50, 6), dtype=int)
    for expert, group in enumerate(groups):
        if group is not None:
            routed[group[0], expert] += 1
    assert (routed.sum(axis=1) == 2).all()
    for token in range(50):
        assert set(np.flatnonzero(routed[token])) == set(experts[token].tolist())


def dense_moe_reference(rt: Transformer, h: np.ndarray, layer: int) -> np.ndarray:
    """Every expert on every token, masked by the top-k gates (zero elsewhere)."""
    moe = rt.weights.layers[layer].moe
    assert moe is not None and rt.spec.moe is not None
    logits = h @ moe.router + (moe.router_bias if moe.router_bias is not None else 0.0)
    top = np.argsort(-logits, axis=1)[:, :rt.spec.moe.top_k]
    weights = np.zeros_like(logits)
    chosen = np.take_along_axis(logits, top, axis=1)
    np.put_along_axis(weights, top, np.exp(chosen) / np.exp(chosen).sum(1, keepdims=True), axis=1)
    out = np.zeros_like(h)
    for e, expert in enumerate(moe.experts):
        up = h @ expert.up + expert.up_bias if expert.up_bias is not None else h @ expert.up
        gate, lin = up[:, :up.shape[1] // 2], up[:, up.shape[1] // 2:]
        act = gate / (1 + np.exp(-gate)) * lin
        y = act @ expert.down + (expert.down_bias if expert.down_bias is not None else 0.0)
        out += weights[:, e:e + 1] * y
    if moe.shared is not None:
        up = h @ moe.shared.up + moe.shared.up_bias if moe.shared.up_bias is not None else h @ moe.shared.up
        gate, lin = up[:, :up.shape[1] // 2], up[:, up.shape[1] // 2:]
        out += (gate / (1 + np.exp(-gate)) * lin) @ moe.shared.down
    return out


@pytest.mark.parametrize("shared", [0, 1])
def test_gathered_experts_equal_the_dense_masked_reference(shared):
    model = spec(mlp_bias=shared == 0, moe={**MOE, "num_shared_experts": shared})
    counter = RowCounter()
    rt = runtime(model, profiler=counter)
    h = np.random.default_rng(3).standard_normal((40, model.hidden_size)).astype(np.float32)
    out = rt._moe(h, rt.weights.layers[0].moe, 0)
    np.testing.assert_allclose(out, dense_moe_reference(rt, h, 0), rtol=1e-4, atol=1e-6)
    # Only routed tokens were multiplied: T * k rows over the experts that got any.
    assert sum(counter.expert_rows) == 40 * MOE["top_k"]
    assert len(counter.expert_rows) <= MOE["num_experts"]


# --- determinism and the torch backend ---------------------------------------------------------

def test_same_seed_same_tokens_other_seed_other_weights():
    model = VARIANTS["moe-shared"]
    prompt = prompt_tokens(model.vocab_size, 2, 8, seed=0)

    def tokens(seed: int) -> np.ndarray:
        rt = runtime(model, seed)
        return generate(rt, prompt, 6, rt.new_cache(2, 13)).tokens

    first = tokens(0)
    np.testing.assert_array_equal(first, tokens(0))
    assert first.shape == (2, 6)
    assert not np.array_equal(init_weights(model, 0).layers[0].qkv, init_weights(model, 1).layers[0].qkv)


@pytest.mark.parametrize("name", ["dense-gqa", "moe-shared", "opt-like", "qk-norm-gelu"])
def test_torch_backend_matches_numpy_at_float32(name):
    pytest.importorskip("torch")
    model = VARIANTS[name]
    prompt = prompt_tokens(model.vocab_size, 2, 10, seed=0)
    weights = init_weights(model, 0)
    outputs = []
    for backend in ("numpy", "torch"):
        rt = Transformer(model, make_backend(backend), weights)
        gen = generate(rt, prompt, 8, rt.new_cache(2, 17))
        logits = rt.ops.to_numpy(rt.forward(prompt, 0, None))
        outputs.append((gen.tokens, logits))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_allclose(outputs[0][1], outputs[1][1], rtol=1e-4, atol=1e-5)


# --- measurement and the CLI -------------------------------------------------------------------

def test_measured_times_are_positive_and_decode_is_faster_than_a_long_prefill():
    result = execute("tiny-dense-58m", batch=1, input_len=128, output_len=4, repeats=1)
    assert result.ttft_s > 0 and result.e2e_s > 0
    assert result.tpot_s is not None and 0 < result.tpot_s < result.ttft_s
    repeat = result.repeats[0]
    assert repeat.dispatch_s_per_step["prefill"] > 0 and repeat.kernel_s_per_step["prefill"] > 0
    # A kernel per simulator op: embedding, 12 per layer, final norm, LM head, sampling.
    assert repeat.kernels_per_step == {"prefill": 3 + 12 * 8 + 1, "decode": 3 + 12 * 8 + 1}
    model = load_model("tiny-dense-58m")
    assert result.memory.weights_bytes == 4 * model.params()
    assert result.memory.kv_cache_bytes == 4 * model.kv_elements_per_token() * (128 + 4 - 1)
    assert result.memory.peak_bytes > result.memory.weights_bytes + result.memory.kv_cache_bytes


def run_cli(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="infersim")
    add_execute_parser(parser.add_subparsers(dest="command"))
    return cmd_execute(parser.parse_args(["execute", *args]))


def test_cli_json_has_the_documented_keys(tmp_path, capsys):
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(VARIANTS["moe-shared"].model_dump(exclude_none=True)))
    assert run_cli(["--model", str(path), "--batch", "2", "--input-len", "16", "--output-len", "3",
                    "--repeats", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("ttft_s", "tpot_s", "e2e_s", "throughput_tokens_per_s", "peak_memory_bytes", "memory",
                "dispatch_s_per_step", "kernels_per_step", "kernel_s_per_step", "ops", "noise", "contention",
                "repeats", "backend", "machine", "output_tokens"):
        assert key in report, key
    assert report["backend"] == "numpy" and len(report["repeats"]) == 2
    assert len(report["output_tokens"]) == 3
    assert report["throughput_tokens_per_s"] == pytest.approx(2 * 3 / report["e2e_s"], rel=0.5)
    assert {"cpu_model", "usable_cores", "numpy", "blas"} <= set(report["machine"])
    assert "experts_up_proj" in report["ops"]["decode"]


def test_cli_table_prints(tmp_path, capsys):
    path = tmp_path / "dense.yaml"
    path.write_text(yaml.safe_dump(VARIANTS["dense-gqa"].model_dump(exclude_none=True)))
    assert run_cli(["--model", str(path), "--input-len", "8", "--output-len", "2", "--repeats", "1"]) == 0
    assert "TTFT" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"model": "deepseek-v2-lite"}, UnsupportedError, "multi-head latent attention"),
        ({"batch": 0}, InferSimError, "batch must be at least 1"),
        ({"output_len": 0}, InferSimError, "output_len must be at least 1"),
        ({"backend": "jax"}, InferSimError, "unknown backend 'jax'"),
        ({"dtype": "float16"}, UnsupportedError, "float32 only"),
        ({"device": "cuda"}, InferSimError, "CPU only"),
        ({"model": "llama-3.1-405b"}, DoesNotFitError, "GiB more than"),
    ],
)
def test_bad_input_is_an_infersim_error(kwargs, error, fragment):
    args = {"model": "tiny-dense-58m", "batch": 1, "input_len": 8, "output_len": 2, **kwargs}
    with pytest.raises(error, match=fragment):
        execute(**args)


def test_missing_torch_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(InferSimError, match="pip install torch"):
        make_backend("torch")


def test_disk_offloaded_layers_give_the_same_tokens_and_read_every_step(tmp_path):
    from simulator.specs.loader import load_model
    from validation.executor.model import Transformer
    from validation.executor.numpy_backend import NumpyBackend
    from validation.executor.weights import init_weights

    spec = load_model("tiny-dense-58m")
    weights = init_weights(spec)
    base = execute(spec, batch=2, input_len=16, output_len=4, repeats=1, weights=weights)
    for prefetch in (True, False):
        moved = execute(spec, batch=2, input_len=16, output_len=4, repeats=1, weights=weights,
                        offload_layers=3, prefetch=prefetch)
        assert moved.output_tokens == base.output_tokens
        assert "weight_load" in moved.ops["decode"]
        assert moved.memory.weights_bytes < base.memory.weights_bytes
    runtime = Transformer(spec, NumpyBackend(), weights)
    runtime.offload_layers(2, prefetch=False, folder=tmp_path)
    cache = runtime.new_cache(1, 8)
    runtime.forward(np.zeros((1, 4), dtype=np.int64), 0, cache)
    assert runtime.disk.bytes_read == 2 * runtime.disk.layer_bytes
    folder = runtime.disk.folder
    runtime.close()
    assert not folder.exists()


def test_kv_window_limits_decode_attention_only():
    full = execute("tiny-dense-58m", batch=1, input_len=32, output_len=4, repeats=1)
    wide = execute("tiny-dense-58m", batch=1, input_len=32, output_len=4, repeats=1, kv_window=64)
    narrow = execute("tiny-dense-58m", batch=1, input_len=32, output_len=4, repeats=1, kv_window=4)
    assert wide.output_tokens == full.output_tokens  # the window holds the whole sequence
    assert narrow.output_tokens[0] == full.output_tokens[0]  # prefill is not evicted
    with pytest.raises(InferSimError, match="offloaded layers"):
        execute("tiny-dense-58m", batch=1, input_len=8, output_len=2, repeats=1, offload_layers=99)


def test_execute_cli_takes_the_strategy_flags(capsys):
    from simulator.cli import main

    assert main(["execute", "--model", "tiny-dense-58m", "--input-len", "8", "--output-len", "2",
                 "--repeats", "1", "--offload-weights", "disk=0.5", "--kv-policy", "window",
                 "--kv-budget", "8", "--json"]) == 0
    assert main(["execute", "--model", "tiny-dense-58m", "--offload-weights", "host=0.5"]) == 2
    assert "unknown tier 'host'" in capsys.readouterr().err
