"""Random weights for a ModelSpec, drawn from a seed, in numpy float32.

Both backends start from these arrays, so the same seed gives the same model
(and, at float32, the same greedy tokens) on numpy and torch.

Matrices are stored ``[in, out]`` so a projection is ``y = x @ W (+ b)``.
Fused layouts follow the simulator's op graph (``simulator/graph/transformer.py``):
one ``qkv_proj`` matrix ``[h, (H + 2 KV) d]`` and, for a gated MLP, one
``up_proj`` matrix ``[h, 2 I]`` holding ``[gate | up]``. Shared experts are one
MLP of width ``num_shared_experts * shared_intermediate``, which equals the sum
of the separate experts.

Scale: every matrix and bias entry is ``N(0, 0.02^2)`` (GPT-2's init), norm
weights are 1 and norm biases 0, so activations stay O(1) through the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simulator.errors import UnsupportedError
from simulator.specs.model import ModelSpec

INIT_STD = 0.02


@dataclass
class MLPWeights:
    """``up`` is ``[h, 2I]`` (gate | up) when gated, else ``[h, I]``; ``down`` is ``[I, h]``."""

    up: np.ndarray
    down: np.ndarray
    up_bias: np.ndarray | None = None
    down_bias: np.ndarray | None = None


@dataclass
class MoEWeights:
    router: np.ndarray  # [h, E]
    experts: list[MLPWeights]
    shared: MLPWeights | None = None
    router_bias: np.ndarray | None = None


@dataclass
class NormWeights:
    weight: np.ndarray
    bias: np.ndarray | None = None  # LayerNorm only


@dataclass
class LayerWeights:
    input_norm: NormWeights
    qkv: np.ndarray  # [h, (H + 2 KV) d]
    o: np.ndarray  # [H d, h]
    post_attention_norm: NormWeights
    mlp: MLPWeights | None = None
    moe: MoEWeights | None = None
    qkv_bias: np.ndarray | None = None
    o_bias: np.ndarray | None = None
    q_norm: np.ndarray | None = None  # [d], per-head RMSNorm (qk_norm)
    k_norm: np.ndarray | None = None


@dataclass
class ModelWeights:
    embedding: np.ndarray  # [V, h]
    layers: list[LayerWeights]
    final_norm: NormWeights
    lm_head: np.ndarray  # [h, V]; a transposed view of the embedding when tied
    position_embedding: np.ndarray | None = None  # [max_positions, h], learned positions
    arrays: list[np.ndarray] = field(default_factory=list)
    """Every distinct parameter array once (a tied head is not counted twice)."""

    def num_params(self) -> int:
        return sum(int(a.size) for a in self.arrays)

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)


def check_supported(model: ModelSpec) -> None:
    """Refuse what the executor does not implement, naming the field."""
    if model.mla is not None:
        raise UnsupportedError(
            f"model {model.name!r}: multi-head latent attention (mla) is not implemented by the "
            "reference executor; use an MHA/GQA model"
        )
    if model.position_encoding == "alibi":
        raise UnsupportedError(
            f"model {model.name!r}: position_encoding 'alibi' is not implemented by the reference "
            "executor (rope, learned and none are)"
        )


class _Init:
    """Draws arrays in a fixed order from one generator and keeps a list of them."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.arrays: list[np.ndarray] = []

    def normal(self, *shape: int) -> np.ndarray:
        array = self.rng.standard_normal(shape, dtype=np.float32)
        array *= np.float32(INIT_STD)
        self.arrays.append(array)
        return array

    def const(self, value: float, *shape: int) -> np.ndarray:
        array = np.full(shape, value, dtype=np.float32)
        self.arrays.append(array)
        return array

    def bias(self, enabled: bool, size: int) -> np.ndarray | None:
        return self.normal(size) if enabled else None


def _norm(init: _Init, model: ModelSpec, width: int) -> NormWeights:
    bias = init.const(0.0, width) if model.norm == "layernorm" else None
    return NormWeights(init.const(1.0, width), bias)


def _mlp(init: _Init, model: ModelSpec, inter: int) -> MLPWeights:
    h = model.hidden_size
    up_width = (2 if model.ffn.gated else 1) * inter
    return MLPWeights(
        up=init.normal(h, up_width),
        down=init.normal(inter, h),
        up_bias=init.bias(model.mlp_bias, up_width),
        down_bias=init.bias(model.mlp_bias, h),
    )


def _moe(init: _Init, model: ModelSpec) -> MoEWeights:
    moe = model.moe
    assert moe is not None
    router = init.normal(model.hidden_size, moe.num_experts)
    router_bias = init.bias(moe.router_bias, moe.num_experts)
    experts = [_mlp(init, model, moe.expert_intermediate_size) for _ in range(moe.num_experts)]
    shared = None
    if moe.num_shared_experts:
        shared = _mlp(init, model, moe.num_shared_experts * moe.shared_intermediate)
    return MoEWeights(router, experts, shared, router_bias)


def _layer(init: _Init, model: ModelSpec, moe_layer: bool) -> LayerWeights:
    h, d = model.hidden_size, model.head_size
    heads, kv = model.num_attention_heads, model.kv_heads
    qkv_width = (heads + 2 * kv) * d
    return LayerWeights(
        input_norm=_norm(init, model, h),
        qkv=init.normal(h, qkv_width),
        qkv_bias=init.bias(model.qkv_bias, qkv_width),
        q_norm=init.const(1.0, d) if model.qk_norm else None,
        k_norm=init.const(1.0, d) if model.qk_norm else None,
        o=init.normal(heads * d, h),
        o_bias=init.bias(model.attention_out_bias, h),
        post_attention_norm=_norm(init, model, h),
        mlp=None if moe_layer else _mlp(init, model, model.ffn.intermediate_size),
        moe=_moe(init, model) if moe_layer else None,
    )


def init_weights(model: ModelSpec, seed: int = 0) -> ModelWeights:
    """Every parameter of ``model``; ``num_params()`` equals ``model.params()``."""
    check_supported(model)
    init = _Init(seed)
    h = model.hidden_size
    embedding = init.normal(model.vocab_size, h)
    position = None
    if model.position_encoding == "learned":
        position = init.normal(model.max_position_embeddings, h)
    layers = [_layer(init, model, moe_layer=i >= model.num_dense_layers) for i in range(model.num_layers)]
    final_norm = _norm(init, model, h)
    lm_head = embedding.T if model.tie_word_embeddings else init.normal(h, model.vocab_size)
    return ModelWeights(embedding, layers, final_norm, lm_head, position, init.arrays)
