"""Axes spec for `qwen3_moe` (Qwen3-MoE): per-head q/k norms, optional dense layers via `mlp_only_layers`."""

from typing import Any

from ._rules import moe_spec, qwen_sparse_layout_hook
from ._slim_moe_fields import qwen_in, qwen_out, require, uniform_window


def _to_slim_moe(config: Any) -> dict:
    return {
        **qwen_in(config),
        "attention_bias": config.attention_bias,
        "attention_output_bias": config.attention_bias,
        "qk_norm": "head",
        "sliding_window": config.sliding_window,
    }


def _from_slim_moe(config: Any) -> dict:
    model_type = "qwen3_moe"
    require(config, model_type, "qk_norm", ("head",), "Qwen3-MoE always applies per-head q/k RMSNorm")
    require(config, model_type, "shared_expert_intermediate_size", (0,), "Qwen3-MoE has no shared expert")
    require(config, model_type, "clip_qkv", (None,), "Qwen3-MoE does not clip q/k/v")
    require(config, model_type, "attention_output_bias", (config.attention_bias,), "one bias flag for q/k/v/o")
    window = uniform_window(config, model_type)
    return {
        **qwen_out(config),
        "attention_bias": config.attention_bias,
        "use_sliding_window": window is not None,
        "sliding_window": window,
    }


SPEC = moe_spec(
    "qwen3_moe",
    dense_mlp=True,
    config_hook=qwen_sparse_layout_hook,
    to_slim_moe=_to_slim_moe,
    from_slim_moe=_from_slim_moe,
)
