"""Axes spec for `qwen2_moe` (Qwen2-MoE / Qwen1.5-MoE): qkv bias, sigmoid-gated shared expert."""

from typing import Any

from ._rules import (
    DEFAULT_MODULES,
    attention_rules,
    decoder_norm_rules,
    dense_mlp_rules,
    embedding_rules,
    head_dim_units,
    qwen_sparse_layout_hook,
    router_expert_rules,
    shared_expert_rules,
)
from .core import ArchSpec


def _hook(old: Any, new: Any, selection: dict) -> None:
    qwen_sparse_layout_hook(old, new, selection)
    if "layer" in selection and getattr(old, "max_window_layers", None) is not None:
        new.max_window_layers = sum(1 for i in selection["layer"].tolist() if i < old.max_window_layers)


SPEC = ArchSpec(
    model_type="qwen2_moe",
    global_rules=embedding_rules(),
    block_rules=decoder_norm_rules()
    + attention_rules()
    + router_expert_rules()
    + shared_expert_rules()
    + dense_mlp_rules(),
    config_fields={},
    units=head_dim_units,
    modules=DEFAULT_MODULES,
    layer_list_fields=("layer_types",),
    config_hook=_hook,
)
