"""Tensor-parallel sharding of a model's shape (Megatron-style column/row split).

One shard of a TP group holds ``1/tp`` of the attention heads (KV heads too,
replicated when there are fewer KV heads than shards), ``1/tp`` of the FFN
width and of every expert; the hidden size and the vocabulary stay whole
(the embedding and LM head are not sharded here). The per-shard model is an
ordinary ``ModelSpec``, so the op graph and costs apply unchanged.
"""

from __future__ import annotations

from simulator.errors import InferSimError
from simulator.specs.model import ModelSpec


def shard_for_tp(model: ModelSpec, tp: int) -> ModelSpec:
    """The shape one of ``tp`` tensor-parallel shards computes."""
    if tp < 1:
        raise InferSimError(f"tensor-parallel degree must be >= 1, got {tp}")
    if tp == 1:
        return model
    heads = model.num_attention_heads
    if heads % tp:
        raise InferSimError(f"tp={tp} does not divide {model.name}'s {heads} attention heads")
    kv = model.kv_heads
    if kv % tp and tp % kv:
        raise InferSimError(f"tp={tp} neither divides nor is a multiple of {kv} KV heads")
    inter = model.ffn.intermediate_size
    if inter % tp:
        raise InferSimError(f"tp={tp} does not divide the FFN width {inter}")
    update: dict = {
        "num_attention_heads": heads // tp,
        "num_kv_heads": max(kv // tp, 1),
        "head_dim": model.head_size if model.mla is None else None,
        "ffn": model.ffn.model_copy(update={"intermediate_size": inter // tp}),
    }
    if model.moe is not None:
        moe = model.moe
        if moe.expert_intermediate_size % tp:
            raise InferSimError(f"tp={tp} does not divide the expert width {moe.expert_intermediate_size}")
        update["moe"] = moe.model_copy(update={
            "expert_intermediate_size": moe.expert_intermediate_size // tp,
            "shared_expert_intermediate_size": (
                moe.shared_intermediate // tp if moe.num_shared_experts else None),
        })
    return model.model_copy(update=update)
