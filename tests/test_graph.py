"""The op graph against hand counts: FLOPs, bytes, experts touched, MLA paths."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulator.graph.transformer import (
    Precision,
    StepShape,
    build_step,
    decode_contexts,
    expected_experts_touched,
    weight_bytes,
)
from simulator.specs.loader import load_model


def total(ops, field):
    return sum(float(np.mean(getattr(op, field))) * op.count for op in ops)


def test_prefill_flops_are_two_per_parameter_per_token_plus_attention():
    model = load_model("llama-2-7b")
    batch, prompt = 2, 256
    ops = build_step(model, StepShape("prefill", batch, prompt, float(prompt)))
    gemm_flops = sum(op.flops * op.count for op in ops if op.kind == "gemm" and op.name != "lm_head")
    non_embedding = model.params() - model.embedding_params() - model.lm_head_params()
    # 2 FLOPs per weight per token, for every weight but the norms'.
    assert gemm_flops == pytest.approx(2 * non_embedding * batch * prompt, rel=1e-3)
    attention = next(op for op in ops if op.name == "attention")
    pairs = prompt * (prompt + 1) / 2
    assert attention.flops == pytest.approx(batch * 32 * pairs * (4 * 128 + 5))


def test_decode_reads_every_weight_once():
    model = load_model("llama-2-7b")
    p = Precision()
    ops = build_step(model, StepShape("decode", 1, 1, 1024.0), p)
    weights_read = total(ops, "weight_bytes")
    # Every layer weight once; of the embedding table only the looked-up row.
    expected = weight_bytes(model, p) - model.embedding_params() * 2 + model.hidden_size * 2
    assert weights_read == pytest.approx(expected, rel=1e-3)
    kv_read = total(ops, "kv_read_bytes")
    assert kv_read == pytest.approx(1024 * 32 * 2 * 32 * 128 * 2)


def test_int4_weights_read_a_quarter_plus_scales():
    model = load_model("llama-2-7b")
    bf16 = total(build_step(model, StepShape("decode", 1, 1, 100.0), Precision()), "weight_bytes")
    int4 = total(build_step(model, StepShape("decode", 1, 1, 100.0), Precision(weight="int4")),
                 "weight_bytes")
    assert 0.25 < int4 / bf16 < 0.30


@given(st.integers(2, 256), st.integers(1, 8), st.integers(1, 4096))
def test_expected_experts_touched_is_bounded(experts, k, tokens):
    k = min(k, experts)
    touched = expected_experts_touched(experts, k, tokens)
    assert k - 1e-9 <= touched <= experts + 1e-9
    assert touched <= min(experts, k * tokens) + 1e-9


def test_moe_decode_reads_only_the_touched_experts():
    model = load_model("mixtral-8x7b")
    one = build_step(model, StepShape("decode", 1, 1, 512.0))
    many = build_step(model, StepShape("decode", 64, 1, 512.0))
    up = lambda ops: next(op for op in ops if op.name == "experts_up_proj")  # noqa: E731
    # One token touches 2 of 8 experts; 64 tokens touch nearly all 8.
    assert up(many).weight_bytes / up(one).weight_bytes == pytest.approx(
        expected_experts_touched(8, 2, 64) / 2)


def test_mla_decode_uses_the_absorbed_latent_path():
    model = load_model("deepseek-v2-lite")
    decode = {op.name for op in build_step(model, StepShape("decode", 4, 1, 2048.0))}
    prefill = {op.name for op in build_step(model, StepShape("prefill", 1, 512, 512.0))}
    assert {"q_absorb", "out_absorb"} <= decode and "kv_up_proj" not in decode
    assert "kv_up_proj" in prefill and "q_absorb" not in prefill


def test_naive_attention_moves_more_bytes_than_flash():
    model = load_model("llama-2-7b")
    step = StepShape("prefill", 1, 2048, 2048.0)
    flash = next(op for op in build_step(model, step, attention="flash") if op.name == "attention")
    naive = [op for op in build_step(model, step, attention="naive") if op.name.startswith("attention")]
    assert [op.name for op in naive] == ["attention_scores", "attention_softmax", "attention_values"]
    assert sum(op.bytes for op in naive) > 10 * flash.bytes
    assert sum(op.flops for op in naive) > flash.flops  # no causal skipping
    # The cached K and V are read once in all: K by the scores, V by the values.
    assert sum(op.kv_read_bytes for op in naive) == pytest.approx(flash.kv_read_bytes)


def test_decode_context_samples_average_to_the_mean_context():
    contexts = decode_contexts(512, 128, samples=16)
    assert len(contexts) == 16
    assert contexts.mean() == pytest.approx(512 + np.arange(1, 128).mean(), rel=1e-3)
    assert list(decode_contexts(10, 5, samples=16)) == [11, 12, 13, 14]


@given(st.integers(1, 300), st.integers(0, 300), st.one_of(st.none(), st.integers(1, 400)))
def test_attended_pairs_match_brute_force(new, cached, window):
    context = new + cached
    step = StepShape("prefill", 1, new, float(context))
    # Query at position q (1-based) sees keys 1..q, the last `window` of them.
    brute = sum(min(q, window or q) for q in range(cached + 1, context + 1))
    assert step.attended_pairs(window=window) == pytest.approx(brute)


def test_sliding_window_caps_kv_cache_and_attention():
    from simulator import estimate

    short = estimate("mistral-7b", "h100-sxm", input_len=4000, output_len=64)
    long = estimate("mistral-7b", "h100-sxm", input_len=16000, output_len=64)
    # 4000 + 64 - 1 tokens are cached for the short prompt; the window caps the long one.
    assert long.memory.kv_cache == pytest.approx(short.memory.kv_cache * 4096 / 4063)
    assert long.tpot_s == pytest.approx(short.tpot_s, rel=0.01)


def test_mla_prefill_reads_materialised_heads_not_the_latent():
    model = load_model("deepseek-v2-lite")
    mla = model.mla
    prefill = build_step(model, StepShape("prefill", 1, 1024, 1024.0))
    attention = next(op for op in prefill if op.name == "attention")
    per_head = model.num_attention_heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim + mla.v_head_dim)
    assert attention.kv_read_bytes == 0  # nothing comes from the cache in a fresh prefill
    assert attention.read_bytes >= 1024 * per_head * 2


def test_sliding_window_prefill_reads_every_key_it_needs():
    model = load_model("mistral-7b")  # window 4096
    step = StepShape("prefill", 1, 8192, 8192.0)
    attention = next(op for op in build_step(model, step) if op.name == "attention")
    assert attention.kv_read_bytes == pytest.approx(8192 * 2 * 8 * 128 * 2)


@given(st.integers(2, 64), st.integers(1, 8), st.integers(1, 64))
def test_single_token_experts_are_among_the_touched(experts, k, tokens):
    from simulator.graph.transformer import expected_single_token_experts

    k = min(k, experts)
    single = expected_single_token_experts(experts, k, tokens)
    assert -1e-12 <= single <= expected_experts_touched(experts, k, tokens) + 1e-9


def test_single_token_experts_by_simulation():
    from simulator.graph.transformer import expected_single_token_experts

    rng = np.random.default_rng(0)
    experts, k, tokens, trials = 8, 2, 3, 20000
    counts = np.zeros(trials)
    for t in range(trials):
        picks = np.concatenate([rng.choice(experts, k, replace=False) for _ in range(tokens)])
        counts[t] = np.sum(np.bincount(picks, minlength=experts) == 1)
    assert counts.mean() == pytest.approx(expected_single_token_experts(experts, k, tokens), rel=0.03)
