"""Axes spec for `deepseek_v3` (DeepSeek-V3 / R1, Kimi-K2, Moonlight): multi-head latent attention, the first
`first_k_dense_replace` layers dense, shared experts of `n_shared_experts * moe_intermediate_size` neurons, sigmoid
routing with `e_score_correction_bias` inside `n_group` groups (`topk_group` of them per token), and MTP layers stored
after the decoder layers (`model.layers.{num_hidden_layers + k}`, with copies of the embedding and the head). The rules
shared with GLM-4-MoE are in `_deepseek_moe.py`.

Multi-head latent attention: the hidden axis runs through `q_a_proj` (or `q_proj`), `kv_a_proj_with_mqa` and
`o_proj`; the low-rank latents (`q_lora_rank`, `kv_lora_rank`, with `q_a_layernorm` / `kv_a_layernorm`) are no axis.
A head is a block of `qk_nope_head_dim + qk_rope_head_dim` rows of `q_b_proj` (or `q_proj`), of
`qk_nope_head_dim + v_head_dim` rows of `kv_b_proj` (its key and value, expanded from the latent shared by all heads)
and of `v_head_dim` columns of `o_proj`; the rotary key is shared by every head. transformers counts as many key/value
heads as heads, so heads prune with `num_key_value_heads` following them (`PruneConfig`: give both, equal).

transformers loads DeepSeek-V3's MTP layers only from `model.layers.61` (the depth of DeepSeek-V3), so a depth cut
moves them where `generate(use_mtp=True)` does not look (see docs/pruning.md).
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
from ._rules import moe_spec, rule
from .core import Dim

_MLA = (
    rule("self_attn.q_proj.weight", Dim("head", 0, "qk_head_dim"), Dim("hidden", 1)),
    rule("self_attn.q_a_proj.weight", Dim("hidden", 1)),
    rule("self_attn.q_b_proj.weight", Dim("head", 0, "qk_head_dim")),
    rule("self_attn.kv_a_proj_with_mqa.weight", Dim("hidden", 1)),
    rule("self_attn.kv_b_proj.weight", Dim("head", 0, "kv_b_head")),
    rule("self_attn.o_proj.weight", Dim("hidden", 0), Dim("head", 1, "v_head_dim")),
    rule("self_attn.o_proj.bias", Dim("hidden", 0)),
)


def _units(config: Any) -> dict[str, int]:
    return {
        "qk_head_dim": config.qk_nope_head_dim + config.qk_rope_head_dim,
        "kv_b_head": config.qk_nope_head_dim + config.v_head_dim,
        "v_head_dim": config.v_head_dim,
    }


SPEC = moe_spec(
    "deepseek_v3",
    attention=_MLA,
    extra_block_rules=SHARED_EXPERT_RULES + MTP_RULES,
    dense_mlp=True,
    config_fields={"num_experts": "n_routed_experts"},
    units=_units,
    pin_fields=(),
    modules=MODULES,
    layer_list_fields=(),
    config_hook=config_hook,
    validate=validate,
    trailing_mtp=TRAILING_MTP,
    expert_groups="n_group",
    no_slim_moe=(
        "deepseek_v3 does not convert to or from SlimMoe: SlimMoe has no multi-head latent attention (low-rank "
        "queries and keys/values: q_lora_rank, kv_lora_rank with q_a_layernorm / kv_a_layernorm, heads of "
        "qk_nope_head_dim + qk_rope_head_dim with a rotary key shared by all heads, v_head_dim), only grouped-query "
        "attention; prune it as deepseek_v3 instead (hf_slim.pruning, MTP layers included)."
    ),
)
