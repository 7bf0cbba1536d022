"""Seed papers' headline effects, reproduced in direction and rough size (docs/reproductions.md).

Each test sets up the paper's model and machine as far as its text allows and checks that the
simulator's effect points the same way and lands within a broad band of the paper's figure; the
figures themselves and the gaps are discussed in docs/reproductions.md.
"""

import pytest

from simulator import estimate
from simulator.errors import DoesNotFitError
from simulator.strategies.kv import KVPolicy
from simulator.strategies.offload import OffloadPlan
from simulator.strategies.plan import search

T4 = "gcp-t4-flexgen"


@pytest.mark.parametrize("model, paper, compressed_paper",
                         [("opt-30b", 7.32, 8.38), ("opt-175b", 0.69, 1.12)])
def test_flexgen_throughput_on_one_t4(model, paper, compressed_paper):
    # FlexGen, Table 2 / README: prompt 512, 32 generated tokens, a 16 GB T4 with 208 GB DRAM and SSD.
    plain = search(model, T4, input_len=512, output_len=32, weight_dtype="fp16", max_batch=1024)
    packed = search(model, T4, input_len=512, output_len=32, weight_dtype="int4", kv_dtype="int4",
                    max_batch=1024)
    assert paper / 3 < plain.result.throughput_tokens_per_s < paper * 3
    # FlexGen dequantizes group-wise int4 in separate GPU kernels; the simulator charges int4 weights
    # at their packed bytes only, so it is optimistic here (docs/reproductions.md): a wider band.
    assert compressed_paper / 3 < packed.result.throughput_tokens_per_s < compressed_paper * 4
    assert plain.plan.weights_off > 0 and packed.plan.weights_off > 0  # neither fits the T4
    assert packed.result.throughput_tokens_per_s > plain.result.throughput_tokens_per_s


def test_h2o_raises_offloaded_throughput():
    # H2O: 20% heavy hitters improve FlexGen's throughput by up to 3x on OPT-6.7B/30B (abstract).
    full = search("opt-30b", T4, input_len=512, output_len=32, weight_dtype="fp16", max_batch=1024)
    h2o = search("opt-30b", T4, input_len=512, output_len=32, weight_dtype="fp16", max_batch=1024,
                 kv_policy=KVPolicy("h2o", 0.2))
    gain = h2o.result.throughput_tokens_per_s / full.result.throughput_tokens_per_s
    assert 1.2 < gain < 6.0


def _largest_batch(**kw):
    batch = 1
    while True:
        try:
            estimate("llama-2-7b", "a100-80gb-sxm", batch=batch * 2, **kw)
        except DoesNotFitError:
            return batch
        batch *= 2


def test_kivi_allows_a_larger_batch_and_more_throughput():
    # KIVI: 2-bit KV lets Llama-2-7B use up to 4x larger batches, 2.35-3.47x throughput (abstract).
    shape = dict(input_len=1024, output_len=1024)
    fp16 = _largest_batch(**shape)
    kivi = _largest_batch(kv_dtype="int2", kv_residual=128, **shape)
    assert kivi >= 4 * fp16
    base = estimate("llama-2-7b", "a100-80gb-sxm", batch=fp16, **shape).throughput_tokens_per_s
    fast = estimate("llama-2-7b", "a100-80gb-sxm", batch=kivi, kv_dtype="int2", kv_residual=128,
                    **shape).throughput_tokens_per_s
    assert 1.5 < fast / base < 8.0


def test_layer_split_on_a_gpu_beats_moving_layers_at_batch_one():
    # llama.cpp-style partial offload: with half of Llama-2-13B's layers on the host, running
    # them on the CPU beats streaming them over PCIe at batch 1, the reason -ngl computes there.
    from simulator.specs.loader import load_model

    model = load_model("llama-2-13b")
    hybrid = estimate(model, "workstation-4090", offload=OffloadPlan.build(model, layers_on_device=20,
                                                                           host_compute=True))
    moved = estimate(model, "workstation-4090", offload=OffloadPlan.build(model, layers_on_device=20))
    assert hybrid.tpot_s < moved.tpot_s
