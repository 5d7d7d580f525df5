"""Axes spec for `qwen2_moe` (Qwen2-MoE / Qwen1.5-MoE): qkv bias, sigmoid-gated shared expert."""

from typing import Any

from ._rules import moe_spec, qwen_sparse_layout_hook
from ._slim_moe_fields import qwen_in, qwen_out, require


def _hook(old: Any, new: Any, selection: dict) -> None:
    qwen_sparse_layout_hook(old, new, selection)
    if "layer" in selection and getattr(old, "max_window_layers", None) is not None:
        new.max_window_layers = sum(1 for i in selection["layer"].tolist() if i < old.max_window_layers)


def _to_slim_moe(config: Any) -> dict:
    return {
        **qwen_in(config),
        "shared_expert_intermediate_size": config.shared_expert_intermediate_size,
        "attention_bias": config.qkv_bias,
        "attention_output_bias": False,
        "qk_norm": None,
        "sliding_window": config.sliding_window or None,
        "layer_types": list(config.layer_types),
    }


def _from_slim_moe(config: Any) -> dict:
    model_type = "qwen2_moe"
    require(config, model_type, "qk_norm", (None,), "Qwen2-MoE has no q/k norm")
    require(config, model_type, "clip_qkv", (None,), "Qwen2-MoE does not clip q/k/v")
    require(config, model_type, "attention_output_bias", (False,), "Qwen2-MoE has no o_proj bias")
    if config.shared_expert_intermediate_size == 0:
        raise ValueError(
            "Cannot convert SlimMoe to 'qwen2_moe': config.shared_expert_intermediate_size=0 but every Qwen2-MoE "
            "sparse layer has a shared expert; choose qwen3_moe, olmoe or mixtral instead."
        )
    sliding = "sliding_attention" in config.layer_types
    return {
        **qwen_out(config),
        "shared_expert_intermediate_size": config.shared_expert_intermediate_size,
        "qkv_bias": config.attention_bias,
        "use_sliding_window": sliding,
        "sliding_window": config.sliding_window if sliding else 4096,
        "layer_types": list(config.layer_types),
    }


SPEC = moe_spec(
    "qwen2_moe",
    shared_expert=True,
    dense_mlp=True,
    config_hook=_hook,
    to_slim_moe=_to_slim_moe,
    from_slim_moe=_from_slim_moe,
)
