"""Flash-backed FFN weights (LLM in a flash): reads follow the active neurons, errors are clear."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.errors import InferSimError
from simulator.estimate import estimate
from simulator.specs.loader import load_system
from simulator.strategies.flash import FlashPlan

T4 = "gcp-t4-flexgen"  # a system with a drive
KW = dict(batch=1, input_len=128, output_len=16, weight_dtype="fp16", act_dtype="fp16", decode_samples=4)


@settings(max_examples=15, deadline=None)
@given(st.floats(0.01, 0.5), st.floats(0.01, 0.5), st.floats(0.0, 1.0))
def test_fewer_active_neurons_and_more_reuse_never_slow_a_step(a, b, reuse):
    low, high = sorted((a, b))
    run = lambda plan: estimate("opt-6.7b", T4, flash=plan, **KW)  # noqa: E731
    assert run(FlashPlan(active=low, reuse=reuse)).tpot_s <= run(FlashPlan(active=high, reuse=reuse)).tpot_s
    assert run(FlashPlan(active=high, reuse=1.0)).tpot_s <= run(FlashPlan(active=high, reuse=reuse)).tpot_s


def test_reads_and_memory_follow_the_plan():
    plain = estimate("opt-6.7b", T4, **KW)
    flashed = estimate("opt-6.7b", T4, flash=FlashPlan(active=0.05, reuse=0.5), **KW)
    reads = flashed.strategy["flash"]["reads_per_step"]
    # A 128-token prompt activates nearly every neuron: it reads almost all FFN weights once.
    ffn = FlashPlan().ffn_bytes(flashed_model := __import__("simulator").load_model("opt-6.7b"), 2.0)
    assert reads["prefill"]["bytes"] == pytest.approx(ffn, rel=0.01)
    # A decode step reads 5% x (1 - 0.5) of the neurons, one bundled read each.
    inter, layers = flashed_model.ffn.intermediate_size, flashed_model.num_layers
    assert reads["decode"]["reads"] == pytest.approx(0.05 * 0.5 * inter * layers)
    assert flashed.memory.weights < plain.memory.weights - 0.5 * ffn
    assert flashed.decode.transfers_s["flash_read"] > 0
    faster = load_system(T4)
    faster = faster.model_copy(update={"storage": faster.storage.model_copy(
        update={"read_bandwidth": faster.storage.read_bandwidth * 4})})
    quicker = estimate("opt-6.7b", faster, flash=FlashPlan(active=0.05, reuse=0.5), **KW)
    assert quicker.tpot_s < flashed.tpot_s


def test_flash_errors_are_clear():
    with pytest.raises(InferSimError, match="no dense FFN"):
        estimate("mixtral-8x7b", T4, flash=FlashPlan(), **KW)
    with pytest.raises(InferSimError, match="no storage"):
        estimate("opt-6.7b", "a100-80gb-sxm", flash=FlashPlan(), **KW)
    with pytest.raises(InferSimError, match="flash-active"):
        FlashPlan(active=0.0)
