"""Rule builders shared by the family specs (Qwen-style tensor names are common to most MoE families)."""

from __future__ import annotations

import re
from typing import Any

from .core import ArchSpec, Dim, TensorRule
from .layout import ExpertStack, StoredLayout

__all__ = [
    "rule",
    "embedding_rules",
    "decoder_norm_rules",
    "attention_rules",
    "router_expert_rules",
    "shared_expert_rules",
    "dense_mlp_rules",
    "head_dim_units",
    "qwen_dense_layers",
    "qwen_sparse_layout_hook",
    "DEFAULT_MODULES",
    "QWEN_STORED_LAYOUT",
    "moe_spec",
]

DEFAULT_MODULES = {
    "decoder_norms": "input_layernorm,post_attention_layernorm",
    "final_norm": "model.norm",
    "router": "mlp.gate",
    "experts": "mlp.experts",
    "attn_out": "self_attn.o_proj",
    "dense_down": "mlp.down_proj",
    "shared_down": "mlp.shared_expert.down_proj",
    "extra_norms": "",
}

#: What `save_pretrained` writes for Qwen-style experts (transformers' "qwen2_moe" weight conversion, shared by
#: qwen3_moe, olmoe and qwen3_next): one gate, up and down projection per expert; every other name unchanged.
QWEN_STORED_LAYOUT = StoredLayout(
    expert_stacks=(
        ExpertStack(
            "mlp.experts.gate_up_proj",
            ("mlp.experts.{expert}.gate_proj.weight", "mlp.experts.{expert}.up_proj.weight"),
        ),
        ExpertStack("mlp.experts.down_proj", ("mlp.experts.{expert}.down_proj.weight",)),
    )
)


def rule(name: str, *dims: Dim, regex: bool = False) -> TensorRule:
    return TensorRule(name if regex else re.escape(name), tuple(dims))


def embedding_rules(final_norm: str = "model.norm.weight") -> tuple[TensorRule, ...]:
    return (
        rule("model.embed_tokens.weight", Dim("hidden", 1)),
        rule("lm_head.weight", Dim("hidden", 1)),
        rule(final_norm, Dim("hidden", 0)),
    )


def decoder_norm_rules() -> tuple[TensorRule, ...]:
    return (
        rule("input_layernorm.weight", Dim("hidden", 0)),
        rule("post_attention_layernorm.weight", Dim("hidden", 0)),
    )


def attention_rules(
    prefix: str = "self_attn", *, q_unit: str = "head_dim", full_qk_norm: bool = False
) -> tuple[TensorRule, ...]:
    """q/k/v/o projections; `q_unit` is the q_proj rows per head (`head_dim_x2` for gated attention)."""
    p = prefix + "."
    rules = [
        rule(p + "q_proj.weight", Dim("head", 0, q_unit), Dim("hidden", 1)),
        rule(p + "q_proj.bias", Dim("head", 0, q_unit)),
        rule(p + "k_proj.weight", Dim("kv_head", 0, "head_dim"), Dim("hidden", 1)),
        rule(p + "k_proj.bias", Dim("kv_head", 0, "head_dim")),
        rule(p + "v_proj.weight", Dim("kv_head", 0, "head_dim"), Dim("hidden", 1)),
        rule(p + "v_proj.bias", Dim("kv_head", 0, "head_dim")),
        rule(p + "o_proj.weight", Dim("hidden", 0), Dim("head", 1, "head_dim")),
        rule(p + "o_proj.bias", Dim("hidden", 0)),
    ]
    if full_qk_norm:
        # OLMoE-style norms span every head: they follow the head axis; per-head norms are left alone
        rules += [
            rule(p + "q_norm.weight", Dim("head", 0, "head_dim")),
            rule(p + "k_norm.weight", Dim("kv_head", 0, "head_dim")),
        ]
    return tuple(rules)


def router_expert_rules(prefix: str = "mlp") -> tuple[TensorRule, ...]:
    p = prefix + "."
    return (
        rule(p + "gate.weight", Dim("expert", 0), Dim("hidden", 1)),
        rule(p + "gate.e_score_correction_bias", Dim("expert", 0)),
        rule(p + "experts.gate_up_proj", Dim("expert", 0), Dim("expert_ffn", 1, 1, 2), Dim("hidden", 2)),
        rule(p + "experts.down_proj", Dim("expert", 0), Dim("hidden", 1), Dim("expert_ffn", 2)),
    )


def _gated_mlp_rules(prefix: str, axis: str) -> tuple[TensorRule, ...]:
    """A gated FFN (`gate_proj`, `up_proj`, `down_proj`) whose intermediate width is `axis`."""
    return (
        rule(prefix + "gate_proj.weight", Dim(axis, 0), Dim("hidden", 1)),
        rule(prefix + "up_proj.weight", Dim(axis, 0), Dim("hidden", 1)),
        rule(prefix + "down_proj.weight", Dim("hidden", 0), Dim(axis, 1)),
    )


def shared_expert_rules(prefix: str = "mlp") -> tuple[TensorRule, ...]:
    p = prefix + "."
    return (*_gated_mlp_rules(p + "shared_expert.", "shared_ffn"), rule(p + "shared_expert_gate.weight", Dim("hidden", 1)))


def dense_mlp_rules(prefix: str = "mlp") -> tuple[TensorRule, ...]:
    return _gated_mlp_rules(prefix + ".", "ffn")


def head_dim_units(config: Any) -> dict[str, int]:
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"head_dim": int(hd), "head_dim_x2": 2 * int(hd)}


def qwen_dense_layers(config: Any) -> list[int]:
    """The Qwen-MoE rule for which decoder layers are dense: listed in `mlp_only_layers`, off the
    `decoder_sparse_step` pattern, or every layer when there are no experts. The one place it is written."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    mlp_only = set(getattr(config, "mlp_only_layers", None) or [])
    n_exp = getattr(config, "num_experts", 0) or 0
    return [
        i
        for i in range(config.num_hidden_layers)
        if i in mlp_only or not (n_exp > 0 and (i + 1) % step == 0)
    ]


def qwen_sparse_layout_hook(old: Any, new: Any, selection: dict) -> None:
    """Dropping layers breaks the `decoder_sparse_step` pattern: spell the dense layers out as `mlp_only_layers`."""
    if "layer" not in selection:
        return
    dense = set(qwen_dense_layers(old))
    kept = selection["layer"].tolist()
    new.decoder_sparse_step = 1
    new.mlp_only_layers = [j for j, i in enumerate(kept) if i in dense]


def moe_spec(
    model_type: str,
    *,
    attention: tuple[TensorRule, ...] | None = None,
    shared_expert: bool = False,
    dense_mlp: bool = False,
    extra_block_rules: tuple[TensorRule, ...] = (),
    **fields: Any,
) -> ArchSpec:
    """An [`ArchSpec`] with what the Qwen-style MoE families share: embedding / norm / head rules, decoder norms,
    q/k/v/o attention (`attention` replaces it), router + routed experts, optionally a shared expert and dense MLP
    layers; canonical config names, `head_dim` units, the default hook modules, `layer_types` following the layers,
    and the Qwen-style stored layout (experts stored one tensor per expert, [`QWEN_STORED_LAYOUT`]).
    `fields` sets or overrides any other [`ArchSpec`] field."""
    block_rules = (
        decoder_norm_rules()
        + (attention_rules() if attention is None else attention)
        + extra_block_rules
        + router_expert_rules()
        + (shared_expert_rules() if shared_expert else ())
        + (dense_mlp_rules() if dense_mlp else ())
    )
    defaults: dict[str, Any] = dict(
        global_rules=embedding_rules(),
        config_fields={},
        units=head_dim_units,
        modules=DEFAULT_MODULES,
        layer_list_fields=("layer_types",),
        stored_layout=QWEN_STORED_LAYOUT,
    )
    return ArchSpec(model_type=model_type, block_rules=block_rules, **{**defaults, **fields})
