"""Model specs: the shape of a decoder-only transformer, dense or MoE, MHA/GQA or MLA.

The parameter count and KV bytes per token follow from the shape alone;
``docs/model.md`` gives the equations.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from simulator.specs.fields import Spec

Activation = Literal["silu", "gelu", "gelu_new", "relu", "swiglu", "geglu"]


class FFNSpec(Spec):
    intermediate_size: int = Field(gt=0)
    activation: Activation = "silu"
    gated: bool = True


class MoESpec(Spec):
    """Mixture of experts: routed experts chosen top-k per token, plus always-on shared experts.

    The first ``first_dense_layers`` layers use the dense ``ffn`` instead.
    """

    num_experts: int = Field(gt=1)
    top_k: int = Field(gt=0)
    expert_intermediate_size: int = Field(gt=0)
    num_shared_experts: int = Field(0, ge=0)
    shared_expert_intermediate_size: int | None = Field(None, gt=0)
    first_dense_layers: int = Field(0, ge=0)
    router_bias: bool = False

    @model_validator(mode="after")
    def _k_within_experts(self) -> MoESpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        return self

    @property
    def shared_intermediate(self) -> int:
        return self.shared_expert_intermediate_size or self.expert_intermediate_size


class MLASpec(Spec):
    """Multi-head latent attention (DeepSeek-V2/V3): K and V are cached as one latent vector."""

    q_lora_rank: int | None = Field(None, gt=0)
    kv_lora_rank: int = Field(gt=0)
    qk_nope_head_dim: int = Field(gt=0)
    qk_rope_head_dim: int = Field(gt=0)
    v_head_dim: int = Field(gt=0)


class ModelSpec(Spec):
    name: str
    architecture: str
    source: str = ""
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    head_dim: int | None = Field(None, gt=0)
    ffn: FFNSpec
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = False
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    position_encoding: Literal["rope", "learned", "alibi", "none"] = "rope"
    max_position_embeddings: int = Field(4096, gt=0)
    qkv_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = Field(None, gt=0)
    """Attention sees (and the KV cache keeps) at most this many recent tokens."""
    moe: MoESpec | None = None
    mla: MLASpec | None = None

    @model_validator(mode="after")
    def _shapes_agree(self) -> ModelSpec:
        kv_heads = self.kv_heads
        if self.num_attention_heads % kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_kv_heads ({kv_heads})"
            )
        if self.head_dim is None and self.mla is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); give head_dim explicitly"
            )
        if self.moe is not None and self.moe.first_dense_layers > self.num_layers:
            raise ValueError("moe.first_dense_layers exceeds num_layers")
        return self

    # --- derived shape -----------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers if self.moe is None else self.moe.first_dense_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def attention_kind(self) -> str:
        if self.mla is not None:
            return "mla"
        if self.kv_heads == 1:
            return "mqa"
        return "gqa" if self.kv_heads < self.num_attention_heads else "mha"

    # --- sizes ---------------------------------------------------------------------------

    def cached_tokens(self, context: float) -> float:
        """Tokens of a sequence held in (and read from) the KV cache: all, or the sliding window."""
        return context if self.sliding_window is None else np.minimum(context, self.sliding_window)

    def kv_elements_per_token(self) -> int:
        """Cached elements per token over all layers: 2 * kv_heads * head_dim (latent for MLA)."""
        if self.mla is not None:
            per_layer = self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        else:
            per_layer = 2 * self.kv_heads * self.head_size
        return per_layer * self.num_layers

    def attention_params(self) -> int:
        h = self.hidden_size
        if self.mla is not None:
            m = self.mla
            heads = self.num_attention_heads
            q_head = m.qk_nope_head_dim + m.qk_rope_head_dim
            if m.q_lora_rank:
                q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * heads * q_head
            else:
                q = h * heads * q_head
            kv_down = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
            kv_up = m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
            out = heads * m.v_head_dim * h
            return q + kv_down + kv_up + out
        q = h * self.num_attention_heads * self.head_size
        kv = 2 * h * self.kv_heads * self.head_size
        out = self.num_attention_heads * self.head_size * h
        biases = (self.num_attention_heads + 2 * self.kv_heads) * self.head_size * self.qkv_bias
        biases += h * self.attention_out_bias
        qk_norm = 2 * self.head_size if self.qk_norm else 0
        return q + kv + out + biases + qk_norm

    def ffn_params(self, intermediate: int) -> int:
        h = self.hidden_size
        matrices = 3 if self.ffn.gated else 2
        biases = ((2 if self.ffn.gated else 1) * intermediate + h) if self.mlp_bias else 0
        return matrices * h * intermediate + biases

    def norm_params(self) -> int:
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    def embedding_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        if self.position_encoding == "learned":
            emb += self.max_position_embeddings * self.hidden_size
        return emb

    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def moe_layer_params(self, active: bool) -> int:
        moe = self.moe
        assert moe is not None
        experts = moe.top_k if active else moe.num_experts
        routed = experts * self.ffn_params(moe.expert_intermediate_size)
        shared = moe.num_shared_experts * self.ffn_params(moe.shared_intermediate)
        router = self.hidden_size * moe.num_experts + (moe.num_experts if moe.router_bias else 0)
        return routed + shared + router

    def layer_params(self, moe_layer: bool, active: bool = False) -> int:
        ffn = (
            self.moe_layer_params(active)
            if moe_layer
            else self.ffn_params(self.ffn.intermediate_size)
        )
        return self.attention_params() + ffn + 2 * self.norm_params()

    def params(self, active: bool = False) -> int:
        """Total parameters, or those one token touches (``active``) for MoE."""
        layers = self.num_dense_layers * self.layer_params(False)
        if self.moe is not None:
            layers += self.num_moe_layers * self.layer_params(True, active)
        return layers + self.embedding_params() + self.lm_head_params() + self.norm_params()
