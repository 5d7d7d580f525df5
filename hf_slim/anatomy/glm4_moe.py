"""Axes spec for `glm4_moe` (GLM-4.5, GLM-4.5-Air, GLM-4.6): grouped-query attention with partial rotary and
optional per-head q/k norms (left alone by every axis), the first `first_k_dense_replace` layers dense, shared
experts of `n_shared_experts * moe_intermediate_size` neurons, sigmoid routing with `e_score_correction_bias` (it
follows the expert axis) inside `n_group` groups, and MTP layers stored after the decoder layers
(`model.layers.{num_hidden_layers + k}`). The rules these share with DeepSeek-V3 are in `_deepseek_moe.py`.

transformers loads GLM-4-MoE's MTP layers only from `model.layers.46` or `model.layers.92` (the depths of GLM-4.5-Air
and GLM-4.5), so a depth cut moves them where `generate(use_mtp=True)` does not look (see docs/pruning.md).
"""

from ._deepseek_moe import (
    MODULES,
    MTP_RULES,
    SHARED_EXPERT_RULES,
    TRAILING_MTP,
    config_hook,
    validate,
)
from ._rules import moe_spec

SPEC = moe_spec(
    "glm4_moe",
    extra_block_rules=SHARED_EXPERT_RULES + MTP_RULES,
    dense_mlp=True,
    config_fields={"num_experts": "n_routed_experts"},
    modules=MODULES,
    layer_list_fields=(),
    config_hook=config_hook,
    validate=validate,
    trailing_mtp=TRAILING_MTP,
    expert_groups="n_group",
)
