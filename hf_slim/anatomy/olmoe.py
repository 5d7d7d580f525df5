"""Axes spec for `olmoe`: expert width is `intermediate_size`; q/k RMSNorms span all heads, so they follow the
head axis, and the modeling code sizes `q_norm` by `hidden_size`: a pruned OLMoE needs
`hidden_size == num_attention_heads * head_dim`."""

from typing import Any

from ._rules import (
    DEFAULT_MODULES,
    attention_rules,
    decoder_norm_rules,
    embedding_rules,
    head_dim_units,
    router_expert_rules,
)
from .core import ArchSpec


def _validate(config: Any) -> None:
    hd = head_dim_units(config)["head_dim"]
    if config.hidden_size != config.num_attention_heads * hd:
        raise ValueError(
            f"hidden_size={config.hidden_size}: OLMoE sizes q_norm by hidden_size, so it must equal "
            f"num_attention_heads * head_dim = {config.num_attention_heads} * {hd} = "
            f"{config.num_attention_heads * hd}; prune hidden_size and num_attention_heads together"
        )


SPEC = ArchSpec(
    model_type="olmoe",
    global_rules=embedding_rules(),
    block_rules=decoder_norm_rules() + attention_rules(full_qk_norm=True) + router_expert_rules(),
    config_fields={"moe_intermediate_size": "intermediate_size"},
    units=head_dim_units,
    modules=DEFAULT_MODULES,
    layer_list_fields=("layer_types",),
    validate=_validate,
)
