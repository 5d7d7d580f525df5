"""Lossless conversion between stock transformers MoE models and SlimMoe.

All supported families store their weights under the same names (`model.layers.N.self_attn.q_proj`,
`mlp.gate`, `mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.shared_expert`, ...), so conversion is a config translation
plus a strict state-dict copy. What each family does differently (biases, q/k norms, shared expert, dense layers,
sliding windows, top-k renormalisation) is a SlimMoe config field, so the logits match the stock model exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from .models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM


_COMMON_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_dropout",
    "num_experts_per_tok",
    "router_aux_loss_coef",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def _common(config: PreTrainedConfig) -> dict:
    fields = {name: getattr(config, name) for name in _COMMON_FIELDS}
    fields["rope_parameters"] = copy.deepcopy(dict(config.rope_parameters))
    fields["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return fields


def _sparse_pattern(config: PreTrainedConfig) -> list[str]:
    # Qwen2-MoE / Qwen3-MoE rule for which layers are MoE.
    only_dense = set(config.mlp_only_layers or [])
    return [
        "sparse"
        if i not in only_dense and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
        else "dense"
        for i in range(config.num_hidden_layers)
    ]


def _qwen3_moe_in(config: Qwen3MoeConfig) -> dict:
    return {
        **_common(config),
        "num_experts": config.num_experts,
        "moe_intermediate_size": config.moe_intermediate_size,
        "intermediate_size": config.intermediate_size,
        "norm_topk_prob": config.norm_topk_prob,
        "attention_bias": config.attention_bias,
        "attention_output_bias": config.attention_bias,
        "qk_norm": "head",
        "sliding_window": config.sliding_window,
        "mlp_layer_types": _sparse_pattern(config),
    }


def _qwen2_moe_in(config: Qwen2MoeConfig) -> dict:
    return {
        **_common(config),
        "num_experts": config.num_experts,
        "moe_intermediate_size": config.moe_intermediate_size,
        "intermediate_size": config.intermediate_size,
        "shared_expert_intermediate_size": config.shared_expert_intermediate_size,
        "norm_topk_prob": config.norm_topk_prob,
        "attention_bias": config.qkv_bias,
        "attention_output_bias": False,
        "qk_norm": None,
        "sliding_window": config.sliding_window or None,
        "layer_types": list(config.layer_types),
        "mlp_layer_types": _sparse_pattern(config),
    }


def _olmoe_in(config: OlmoeConfig) -> dict:
    return {
        **_common(config),
        "num_experts": config.num_experts,
        "moe_intermediate_size": config.intermediate_size,
        "norm_topk_prob": config.norm_topk_prob,
        "attention_bias": config.attention_bias,
        "attention_output_bias": config.attention_bias,
        "qk_norm": "full",
        "clip_qkv": config.clip_qkv,
    }


def _mixtral_in(config: MixtralConfig) -> dict:
    return {
        **_common(config),
        "num_experts": config.num_local_experts,
        "moe_intermediate_size": config.intermediate_size,
        "norm_topk_prob": True,
        "qk_norm": None,
        "sliding_window": config.sliding_window,
    }


def _require(config: SlimMoeConfig, model_type: str, field: str, allowed, why: str) -> None:
    value = getattr(config, field)
    if value not in allowed:
        raise ValueError(
            f"Cannot convert SlimMoe to {model_type!r}: config.{field}={value!r} but {model_type} supports only "
            f"{allowed} ({why})."
        )


def _out_common(config: SlimMoeConfig) -> dict:
    fields = {name: getattr(config, name) for name in _COMMON_FIELDS}
    fields["rope_parameters"] = copy.deepcopy(dict(config.rope_parameters))
    fields["head_dim"] = config.head_dim
    return fields


def _uniform_window(config: SlimMoeConfig, model_type: str) -> int | None:
    kinds = set(config.layer_types)
    if len(kinds) > 1:
        raise ValueError(
            f"Cannot convert SlimMoe to {model_type!r}: config.layer_types mixes {sorted(kinds)} but {model_type} "
            "applies one attention type to every layer."
        )
    return config.sliding_window if kinds == {"sliding_attention"} else None


def _dense_layers(config: SlimMoeConfig) -> list[int]:
    return [i for i, kind in enumerate(config.mlp_layer_types) if kind == "dense"]


def _qwen3_moe_out(config: SlimMoeConfig) -> dict:
    model_type = "qwen3_moe"
    _require(config, model_type, "qk_norm", ("head",), "Qwen3-MoE always applies per-head q/k RMSNorm")
    _require(config, model_type, "shared_expert_intermediate_size", (0,), "Qwen3-MoE has no shared expert")
    _require(config, model_type, "clip_qkv", (None,), "Qwen3-MoE does not clip q/k/v")
    _require(config, model_type, "attention_output_bias", (config.attention_bias,), "one bias flag for q/k/v/o")
    window = _uniform_window(config, model_type)
    return {
        **_out_common(config),
        "num_experts": config.num_experts,
        "moe_intermediate_size": config.moe_intermediate_size,
        "intermediate_size": config.intermediate_size,
        "norm_topk_prob": config.norm_topk_prob,
        "attention_bias": config.attention_bias,
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "mlp_only_layers": _dense_layers(config),
    }


def _qwen2_moe_out(config: SlimMoeConfig) -> dict:
    model_type = "qwen2_moe"
    _require(config, model_type, "qk_norm", (None,), "Qwen2-MoE has no q/k norm")
    _require(config, model_type, "clip_qkv", (None,), "Qwen2-MoE does not clip q/k/v")
    _require(config, model_type, "attention_output_bias", (False,), "Qwen2-MoE has no o_proj bias")
    if config.shared_expert_intermediate_size == 0:
        raise ValueError(
            "Cannot convert SlimMoe to 'qwen2_moe': config.shared_expert_intermediate_size=0 but every Qwen2-MoE "
            "sparse layer has a shared expert; choose qwen3_moe, olmoe or mixtral instead."
        )
    sliding = "sliding_attention" in config.layer_types
    return {
        **_out_common(config),
        "num_experts": config.num_experts,
        "moe_intermediate_size": config.moe_intermediate_size,
        "intermediate_size": config.intermediate_size,
        "shared_expert_intermediate_size": config.shared_expert_intermediate_size,
        "norm_topk_prob": config.norm_topk_prob,
        "qkv_bias": config.attention_bias,
        "use_sliding_window": sliding,
        "sliding_window": config.sliding_window if sliding else 4096,
        "layer_types": list(config.layer_types),
        "mlp_only_layers": _dense_layers(config),
    }


def _all_sparse(config: SlimMoeConfig, model_type: str) -> None:
    if _dense_layers(config):
        raise ValueError(
            f"Cannot convert SlimMoe to {model_type!r}: config.mlp_layer_types has dense layers "
            f"{_dense_layers(config)} but every {model_type} layer is sparse."
        )
    _require(config, model_type, "shared_expert_intermediate_size", (0,), f"{model_type} has no shared expert")


def _olmoe_out(config: SlimMoeConfig) -> dict:
    model_type = "olmoe"
    _all_sparse(config, model_type)
    _require(config, model_type, "qk_norm", ("full",), "OLMoE normalises the full q/k projections")
    _require(config, model_type, "attention_output_bias", (config.attention_bias,), "one bias flag for q/k/v/o")
    _require(config, model_type, "head_dim", (config.hidden_size // config.num_attention_heads,), "no head_dim field")
    _uniform_window(config, model_type)
    _require(config, model_type, "layer_types", (["full_attention"] * config.num_hidden_layers,), "no sliding window")
    fields = _out_common(config)
    fields.pop("head_dim")
    return {
        **fields,
        "num_experts": config.num_experts,
        "intermediate_size": config.moe_intermediate_size,
        "norm_topk_prob": config.norm_topk_prob,
        "attention_bias": config.attention_bias,
        "clip_qkv": config.clip_qkv,
    }


def _mixtral_out(config: SlimMoeConfig) -> dict:
    model_type = "mixtral"
    _all_sparse(config, model_type)
    _require(config, model_type, "qk_norm", (None,), "Mixtral has no q/k norm")
    _require(config, model_type, "clip_qkv", (None,), "Mixtral does not clip q/k/v")
    _require(config, model_type, "attention_bias", (False,), "Mixtral has no attention biases")
    _require(config, model_type, "attention_output_bias", (False,), "Mixtral has no attention biases")
    _require(config, model_type, "norm_topk_prob", (True,), "Mixtral always renormalises the top-k weights")
    return {
        **_out_common(config),
        "num_local_experts": config.num_experts,
        "intermediate_size": config.moe_intermediate_size,
        "sliding_window": _uniform_window(config, model_type),
    }


@dataclass(frozen=True)
class _Family:
    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    to_slim: Callable[[PreTrainedConfig], dict]
    from_slim: Callable[[SlimMoeConfig], dict]


FAMILIES: dict[str, _Family] = {
    "qwen3_moe": _Family(Qwen3MoeConfig, Qwen3MoeForCausalLM, _qwen3_moe_in, _qwen3_moe_out),
    "qwen2_moe": _Family(Qwen2MoeConfig, Qwen2MoeForCausalLM, _qwen2_moe_in, _qwen2_moe_out),
    "olmoe": _Family(OlmoeConfig, OlmoeForCausalLM, _olmoe_in, _olmoe_out),
    "mixtral": _Family(MixtralConfig, MixtralForCausalLM, _mixtral_in, _mixtral_out),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))


def _family(model_type: str) -> _Family:
    if model_type not in FAMILIES:
        raise ValueError(
            f"Unsupported model_type {model_type!r}; hf_slim.convert supports {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return FAMILIES[model_type]


def slim_config_from_hf(config: PreTrainedConfig, num_mtp_heads: int = 0) -> SlimMoeConfig:
    """Translate a stock MoE config into the equivalent `SlimMoeConfig`.

    Args:
        config: A config of one of `SUPPORTED_MODEL_TYPES`.
        num_mtp_heads: Number of MTP depths to add.
    """
    fields = _family(config.model_type).to_slim(config)
    return SlimMoeConfig(**fields, num_mtp_heads=num_mtp_heads)


def hf_config_from_slim(config: SlimMoeConfig, model_type: str) -> PreTrainedConfig:
    """Translate a `SlimMoeConfig` into the stock config of `model_type`, or raise naming the field it cannot hold."""
    family = _family(model_type)
    if isinstance(config.moe_intermediate_size, list):
        raise ValueError(
            f"Cannot convert SlimMoe to {model_type!r}: config.moe_intermediate_size is a per-layer list "
            f"{config.moe_intermediate_size} but {model_type} holds one expert width for every layer."
        )
    return family.config_class(**family.from_slim(config))


def _copy_attn_implementation(source: PreTrainedModel, target: PreTrainedModel) -> None:
    implementation = source.config._attn_implementation
    if implementation is not None and implementation != target.config._attn_implementation:
        target.set_attn_implementation(implementation)


@torch.no_grad()
def _init_mtp_from_last_layer(model: SlimMoeForCausalLM) -> None:
    sparse = [i for i, kind in enumerate(model.config.mlp_layer_types) if kind == "sparse"]
    if model.mtp is None or not sparse:
        return
    source = model.model.layers[sparse[-1]].state_dict()
    for layer in model.mtp.layers:
        layer.load_state_dict(source)


def from_hf(model: PreTrainedModel, num_mtp_heads: int = 0, mtp_init: str = "last_layer") -> SlimMoeForCausalLM:
    """Convert a stock transformers MoE causal LM into a `SlimMoeForCausalLM` with identical logits.

    Args:
        model: A `Qwen3MoeForCausalLM`, `Qwen2MoeForCausalLM`, `OlmoeForCausalLM` or `MixtralForCausalLM`.
        num_mtp_heads: MTP depths to add. They are new weights: `fc` and the norms get the model's standard init
            (normal(0, initializer_range) / ones) and, with `mtp_init="last_layer"`, every MTP block starts as a copy
            of the last sparse decoder block (a warm start; `mtp_init="random"` keeps the standard init).
        mtp_init: `"last_layer"` or `"random"`.

    Returns:
        The SlimMoe model, in the source model's dtype and attention implementation.
    """
    if mtp_init not in ("last_layer", "random"):
        raise ValueError(f"mtp_init must be 'last_layer' or 'random', got {mtp_init!r}.")
    config = slim_config_from_hf(model.config, num_mtp_heads=num_mtp_heads)
    slim = SlimMoeForCausalLM(config).to(dtype=model.dtype, device=model.device)
    missing, unexpected = slim.load_state_dict(model.state_dict(), strict=False)
    missing = [key for key in missing if not key.startswith("mtp.") and key != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"State dict mismatch converting {model.config.model_type}: missing {missing}, unexpected {unexpected}.")
    if mtp_init == "last_layer":
        _init_mtp_from_last_layer(slim)
    _copy_attn_implementation(model, slim)
    return slim.eval() if not model.training else slim


def to_hf(model: SlimMoeForCausalLM, model_type: str) -> PreTrainedModel:
    """Convert a `SlimMoeForCausalLM` into the stock transformers model of `model_type` with identical logits.

    MTP heads have no place in stock modules and are dropped here; `hf_slim.hub.save_for_hub(..., model_type=...)`
    can keep them in the checkpoint under `mtp.*` (hf-slim's own layout), which stock transformers ignores.

    Raises:
        ValueError: if `model_type` is unsupported (the message lists the supported ones) or the SlimMoe config uses
            a feature that family cannot express (the message names the field).
    """
    config = hf_config_from_slim(model.config, model_type)
    stock = _family(model_type).model_class(config).to(dtype=model.dtype, device=model.device)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("mtp.")}
    stock.load_state_dict(state, strict=not config.tie_word_embeddings)
    _copy_attn_implementation(model, stock)
    return stock.eval() if not model.training else stock


__all__ = ["FAMILIES", "SUPPORTED_MODEL_TYPES", "from_hf", "hf_config_from_slim", "slim_config_from_hf", "to_hf"]
