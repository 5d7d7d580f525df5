"""Axes spec for `olmoe`: expert width is `intermediate_size`; q/k RMSNorms span all heads, so they follow the
head axis, and the modeling code sizes `q_norm` by `hidden_size`: a pruned OLMoE needs
`hidden_size == num_attention_heads * head_dim`."""

from typing import Any

from ._rules import attention_rules, head_dim_units, moe_spec
from ._slim_moe_fields import all_sparse, carried_in, carried_out, common_in, common_out, require, uniform_window


def _validate(config: Any) -> None:
    hd = head_dim_units(config)["head_dim"]
    if config.hidden_size != config.num_attention_heads * hd:
        raise ValueError(
            f"hidden_size={config.hidden_size}: OLMoE sizes q_norm by hidden_size, so it must equal "
            f"num_attention_heads * head_dim = {config.num_attention_heads} * {hd} = "
            f"{config.num_attention_heads * hd}; prune hidden_size and num_attention_heads together"
        )


#: SlimMoe fields OLMoE holds one to one; `_RENAMED` says which under another name (also the spec's config fields).
_CARRIED = ("num_experts", "moe_intermediate_size", "norm_topk_prob", "attention_bias", "clip_qkv")
_RENAMED = {"moe_intermediate_size": "intermediate_size"}


def _to_slim_moe(config: Any) -> dict:
    fields = {**common_in(config), **carried_in(config, _CARRIED, _RENAMED)}
    return {**fields, "attention_output_bias": config.attention_bias, "qk_norm": "full"}


def _from_slim_moe(config: Any) -> dict:
    model_type = "olmoe"
    all_sparse(config, model_type)
    require(config, model_type, "qk_norm", ("full",), "OLMoE normalises the full q/k projections")
    require(config, model_type, "attention_output_bias", (config.attention_bias,), "one bias flag for q/k/v/o")
    require(config, model_type, "head_dim", (config.hidden_size // config.num_attention_heads,), "no head_dim field")
    uniform_window(config, model_type)
    require(config, model_type, "layer_types", (["full_attention"] * config.num_hidden_layers,), "no sliding window")
    fields = common_out(config)
    fields.pop("head_dim")
    return {**fields, **carried_out(config, _CARRIED, _RENAMED)}


SPEC = moe_spec(
    "olmoe",
    attention=attention_rules(full_qk_norm=True),
    config_fields=_RENAMED,
    validate=_validate,
    to_slim_moe=_to_slim_moe,
    from_slim_moe=_from_slim_moe,
)
