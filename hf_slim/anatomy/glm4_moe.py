"""Axes spec for `glm4_moe` (GLM-4.5, GLM-4.5-Air, GLM-4.6): grouped-query attention with partial rotary and
optional per-head q/k norms (left alone by every axis), the first `first_k_dense_replace` layers dense, shared
experts of `n_shared_experts * moe_intermediate_size` neurons, sigmoid routing with `e_score_correction_bias` (it
follows the expert axis) inside `n_group` groups, and MTP layers stored after the decoder layers
(`model.layers.{num_hidden_layers + k}`). The rules these share with DeepSeek-V3 are in `_deepseek_moe.py`.

transformers loads GLM-4-MoE's MTP layers only from `model.layers.46` or `model.layers.92` (the depths of GLM-4.5-Air
and GLM-4.5), so a depth cut moves them where `generate(use_mtp=True)` does not look (see docs/pruning.md).

Conversion to and from SlimMoe (`hf_slim.convert`): every GLM-4-MoE feature is a SlimMoe field (`router_scoring=
"sigmoid"`, `n_group`, `topk_group`, `routed_scaling_factor`, an ungated shared expert, `partial_rotary_factor` in
`rope_parameters`, dense layers first); the shared experts are SlimMoe's `mlp.shared_expert` and MTP layer `N + k`
is SlimMoe's `mtp.layers.{k}` (`shared_head.norm` being its `post_norm`).
"""

from typing import Any

from ._deepseek_moe import (
    MODULES,
    MTP_RULES,
    SHARED_EXPERT_RULES,
    TRAILING_MTP,
    config_hook,
    validate,
)
from ._rules import moe_spec
from ._slim_moe_fields import carried_in, carried_out, common_in, common_out, require, slim_dense_layers

#: SlimMoe fields GLM-4-MoE holds one to one (`num_experts` under its own name, the spec's config field).
_CARRIED = (
    "num_experts", "moe_intermediate_size", "intermediate_size", "norm_topk_prob", "attention_bias", "n_group",
    "topk_group", "routed_scaling_factor",
)  # fmt: skip
_RENAMED = {"num_experts": "n_routed_experts"}
_MODEL_TYPE = "glm4_moe"


def _to_slim_moe(config: Any) -> dict:
    if not config.n_shared_experts:
        raise ValueError(
            "Cannot convert 'glm4_moe' to SlimMoe: config.n_shared_experts=0 builds empty shared experts, which "
            "SlimMoe does not hold (every GLM-4.5 / 4.6 checkpoint has n_shared_experts >= 1)."
        )
    dense = config.first_k_dense_replace or 0
    return {
        **common_in(config),
        **carried_in(config, _CARRIED, _RENAMED),
        "mlp_layer_types": ["dense" if i < dense else "sparse" for i in range(config.num_hidden_layers)],
        "shared_expert_intermediate_size": config.n_shared_experts * config.moe_intermediate_size,
        "shared_expert_gated": False,
        "router_scoring": "sigmoid",
        "attention_output_bias": False,
        "qk_norm": "head" if config.use_qk_norm else None,
        "sliding_window": None,
    }


def _from_slim_moe(config: Any) -> dict:
    why = "GLM-4-MoE routes by sigmoid scores with e_score_correction_bias"
    require(config, _MODEL_TYPE, "router_scoring", ("sigmoid",), why)
    require(config, _MODEL_TYPE, "shared_expert_gated", (False,), "GLM-4-MoE's shared experts have no sigmoid gate")
    require(config, _MODEL_TYPE, "qk_norm", (None, "head"), "GLM-4-MoE's optional q/k norms are per head")
    require(config, _MODEL_TYPE, "clip_qkv", (None,), "GLM-4-MoE does not clip q/k/v")
    require(config, _MODEL_TYPE, "attention_output_bias", (False,), "GLM-4-MoE has no o_proj bias")
    if "sliding_attention" in config.layer_types:
        raise ValueError(
            "Cannot convert SlimMoe to 'glm4_moe': config.layer_types has 'sliding_attention' layers but GLM-4-MoE "
            "attends over the whole sequence in every layer."
        )
    dense = slim_dense_layers(config)
    if dense != list(range(len(dense))):
        raise ValueError(
            f"Cannot convert SlimMoe to 'glm4_moe': config.mlp_layer_types has dense layers {dense} but GLM-4-MoE "
            "builds its first first_k_dense_replace layers dense and every later one sparse."
        )
    shared, width = config.shared_expert_intermediate_size, config.moe_intermediate_size
    if not shared or shared % width:
        raise ValueError(
            f"Cannot convert SlimMoe to 'glm4_moe': config.shared_expert_intermediate_size={shared} but GLM-4-MoE "
            f"sizes its shared experts as n_shared_experts * moe_intermediate_size, a positive multiple of {width}."
        )
    rope = dict(config.rope_parameters)
    rope.setdefault("partial_rotary_factor", 1.0)  # Glm4MoeConfig would default it to 0.5
    fields = {
        **common_out(config),
        **carried_out(config, _CARRIED, _RENAMED),
        "rope_parameters": rope,
        "n_shared_experts": shared // width,
        "first_k_dense_replace": len(dense),
        "use_qk_norm": config.qk_norm == "head",
        "num_nextn_predict_layers": config.num_mtp_heads,
    }
    fields.pop("router_aux_loss_coef", None)  # no GLM-4-MoE field
    return fields


SPEC = moe_spec(
    "glm4_moe",
    extra_block_rules=SHARED_EXPERT_RULES + MTP_RULES,
    dense_mlp=True,
    config_fields=_RENAMED,
    modules=MODULES,
    layer_list_fields=(),
    config_hook=config_hook,
    validate=validate,
    trailing_mtp=TRAILING_MTP,
    expert_groups="n_group",
    to_slim_moe=_to_slim_moe,
    from_slim_moe=_from_slim_moe,
    slim_moe_renames=(("mlp.shared_experts.", "mlp.shared_expert."),),
)
