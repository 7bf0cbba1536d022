"""Read a Hugging Face ``config.json`` into a ModelSpec, dispatching on its architecture field.

Each supported family has one translator; an unknown architecture is an
error that lists the supported ones (never a guess from the model's name).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulator.errors import SpecError
from simulator.specs.loader import validate
from simulator.specs.model import ModelSpec

Config = dict[str, Any]


def _need(config: Config, key: str, source: str) -> Any:
    if key not in config or config[key] is None:
        raise SpecError(source, key, "required field is missing from config.json")
    return config[key]


def _activation(config: Config, key: str = "hidden_act") -> str:
    act = config.get(key, "silu")
    return {"swish": "silu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu"}.get(act, act)


def _model_name(config: Config, source: str) -> str:
    name = config.get("_name_or_path") or ""
    # A hub id ("org/model") names the model; a local path ("/mnt/ckpt") does not.
    if not name or name.startswith(("/", ".", "~")):
        return Path(source).parent.name if Path(source).stem == "config" else Path(source).stem
    return name


def _sliding_window(config: Config) -> int | None:
    if config.get("use_sliding_window") is False:
        return None
    return config.get("sliding_window") or None


def _common(config: Config, source: str) -> Config:
    return {
        "name": _model_name(config, source),
        "architecture": (config.get("architectures") or [config.get("model_type", "?")])[0],
        "source": f"Hugging Face config.json ({source})",
        "num_layers": _need(config, "num_hidden_layers", source),
        "hidden_size": _need(config, "hidden_size", source),
        "num_attention_heads": _need(config, "num_attention_heads", source),
        "num_kv_heads": config.get("num_key_value_heads"),
        "head_dim": config.get("head_dim"),
        "vocab_size": _need(config, "vocab_size", source),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "max_position_embeddings": config.get("max_position_embeddings", 4096),
        "sliding_window": _sliding_window(config),
    }


def _llama(config: Config, source: str) -> Config:
    bias = bool(config.get("attention_bias", False))
    return {
        **_common(config, source),
        "ffn": {
            "intermediate_size": _need(config, "intermediate_size", source),
            "activation": _activation(config),
            "gated": True,
        },
        "qkv_bias": bias,
        "attention_out_bias": bias,
        "mlp_bias": bool(config.get("mlp_bias", False)),
    }


def _qwen2(config: Config, source: str) -> Config:
    return {**_llama(config, source), "qkv_bias": True, "attention_out_bias": False}


def _qwen3(config: Config, source: str) -> Config:
    return {**_llama(config, source), "qk_norm": True}


def _mixtral(config: Config, source: str) -> Config:
    spec = _llama(config, source)
    spec["moe"] = {
        "num_experts": _need(config, "num_local_experts", source),
        "top_k": _need(config, "num_experts_per_tok", source),
        "expert_intermediate_size": _need(config, "intermediate_size", source),
    }
    return spec


def _qwen_moe(config: Config, source: str, base: Callable[[Config, str], Config]) -> Config:
    spec = base(config, source)
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise SpecError(source, "mlp_only_layers", "interleaved dense/MoE layers are not supported")
    shared = config.get("shared_expert_intermediate_size") or 0
    spec["moe"] = {
        "num_experts": _need(config, "num_experts", source),
        "top_k": _need(config, "num_experts_per_tok", source),
        "expert_intermediate_size": _need(config, "moe_intermediate_size", source),
        "num_shared_experts": 1 if shared else 0,
        "shared_expert_intermediate_size": shared or None,
    }
    return spec


def _deepseek(config: Config, source: str) -> Config:
    spec = _llama(config, source)
    spec["num_kv_heads"] = None  # MLA: every head reads the shared latent
    spec["head_dim"] = None
    spec["mla"] = {
        "q_lora_rank": config.get("q_lora_rank"),
        "kv_lora_rank": _need(config, "kv_lora_rank", source),
        "qk_nope_head_dim": _need(config, "qk_nope_head_dim", source),
        "qk_rope_head_dim": _need(config, "qk_rope_head_dim", source),
        "v_head_dim": _need(config, "v_head_dim", source),
    }
    if config.get("moe_layer_freq", 1) != 1:
        raise SpecError(source, "moe_layer_freq", "interleaved dense/MoE layers are not supported")
    if config.get("n_routed_experts"):
        spec["moe"] = {
            "num_experts": config["n_routed_experts"],
            "top_k": _need(config, "num_experts_per_tok", source),
            "expert_intermediate_size": _need(config, "moe_intermediate_size", source),
            "num_shared_experts": config.get("n_shared_experts") or 0,
            "first_dense_layers": config.get("first_k_dense_replace", 0),
            "router_bias": config.get("topk_method") == "noaux_tc",
        }
    return spec


def _opt(config: Config, source: str) -> Config:
    if config.get("word_embed_proj_dim", config["hidden_size"]) != config["hidden_size"]:
        raise SpecError(source, "word_embed_proj_dim", "projected embeddings are not supported")
    spec = _common(config, source)
    spec.update(
        {
            "num_kv_heads": None,
            "ffn": {
                "intermediate_size": _need(config, "ffn_dim", source),
                "activation": _activation(config, "activation_function"),
                "gated": False,
            },
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", True)),
            "norm": "layernorm",
            "position_encoding": "learned",
            # OPT's learned position table has two extra rows (padding offset).
            "max_position_embeddings": spec["max_position_embeddings"] + 2,
            "qkv_bias": bool(config.get("enable_bias", True)),
            "attention_out_bias": bool(config.get("enable_bias", True)),
            "mlp_bias": bool(config.get("enable_bias", True)),
        }
    )
    return spec


def _gpt_neox(config: Config, source: str) -> Config:
    spec = _common(config, source)
    spec.update(
        {
            "num_kv_heads": None,
            "ffn": {
                "intermediate_size": _need(config, "intermediate_size", source),
                "activation": _activation(config),
                "gated": False,
            },
            "norm": "layernorm",
            "qkv_bias": bool(config.get("attention_bias", True)),
            "attention_out_bias": bool(config.get("attention_bias", True)),
            "mlp_bias": True,
        }
    )
    return spec


TRANSLATORS: dict[str, Callable[[Config, str], Config]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _llama,
    "MixtralForCausalLM": _mixtral,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
    "Qwen2MoeForCausalLM": lambda c, s: _qwen_moe(c, s, _qwen2),
    "Qwen3MoeForCausalLM": lambda c, s: _qwen_moe(c, s, _qwen3),
    "OPTForCausalLM": _opt,
    "GPTNeoXForCausalLM": _gpt_neox,
    "DeepseekV2ForCausalLM": _deepseek,
    "DeepseekV3ForCausalLM": _deepseek,
}


def model_from_hf_config(config: Config, source: str) -> ModelSpec:
    architectures = config.get("architectures") or []
    if not architectures:
        raise SpecError(source, "architectures", "missing; cannot tell which model family this is")
    arch = architectures[0]
    translate = TRANSLATORS.get(arch)
    if translate is None:
        supported = ", ".join(sorted(TRANSLATORS))
        raise SpecError(source, "architectures", f"unsupported {arch!r}; supported: {supported}")
    return validate(ModelSpec, translate(config, source), source)
