"""Axes spec for `mixtral`: every layer sparse, experts counted by `num_local_experts`, expert width by
`intermediate_size`."""

from ._rules import (
    DEFAULT_MODULES,
    attention_rules,
    decoder_norm_rules,
    embedding_rules,
    head_dim_units,
    router_expert_rules,
)
from .core import ArchSpec

SPEC = ArchSpec(
    model_type="mixtral",
    global_rules=embedding_rules(),
    block_rules=decoder_norm_rules() + attention_rules() + router_expert_rules(),
    config_fields={"num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size"},
    units=head_dim_units,
    modules=DEFAULT_MODULES,
    layer_list_fields=("layer_types",),
)
