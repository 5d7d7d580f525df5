"""Axes spec for `qwen3_moe` (Qwen3-MoE): per-head q/k norms, optional dense layers via `mlp_only_layers`."""

from ._rules import (
    DEFAULT_MODULES,
    attention_rules,
    decoder_norm_rules,
    dense_mlp_rules,
    embedding_rules,
    head_dim_units,
    qwen_sparse_layout_hook,
    router_expert_rules,
)
from .core import ArchSpec

SPEC = ArchSpec(
    model_type="qwen3_moe",
    global_rules=embedding_rules(),
    block_rules=decoder_norm_rules() + attention_rules() + router_expert_rules() + dense_mlp_rules(),
    config_fields={},
    units=head_dim_units,
    modules=DEFAULT_MODULES,
    layer_list_fields=("layer_types",),
    config_hook=qwen_sparse_layout_hook,
)
