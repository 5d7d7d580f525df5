"""Axes spec for `slim_moe` (this project's family): Qwen3-MoE/Qwen3-Next tensor names, optional shared expert
(sigmoid-gated or not), per-layer `mlp_layer_types` ("sparse"/"dense"), q/k norms per head (`qk_norm="head"`), over
all heads (`"full"`) or absent, and multi-token-prediction heads. With `router_scoring="sigmoid"` the router's
`e_score_correction_bias` follows the expert axis and, with `n_group` > 1, an expert selection keeps the same number of
experts in every kept group, group by group (as for GLM-4-MoE, `_deepseek_moe.py`).

MTP (transformers' MTP layout, see `docs/mtp.md`): depth K is the block `mtp.layers.K`, a sparse decoder block with its
own per-layer axes (it keeps its numbering when decoder layers are dropped) plus `enorm`, `hnorm`, `post_norm` (hidden)
and `eh_proj.weight [H, 2H]`, which takes cat[enorm(embedding), hnorm(hidden)], so its input dim holds the hidden axis
twice (`parts=2`). `mtp.norm.weight` exists only with `mtp_shared_norm` (the first hf-slim layout's arithmetic).
"""

from typing import Any

from ._deepseek_moe import group_order
from ._rules import embedding_rules, moe_spec, rule
from .core import Dim, TensorRule
from .layout import IDENTITY_LAYOUT
from .vocabulary import AXIS_SIZE_FIELDS

_mtp = (rule("mtp.norm.weight", Dim("hidden", 0)),)
# per MTP depth, next to its decoder block's tensors (decoder layers have none of these)
_mtp_block = (
    rule("enorm.weight", Dim("hidden", 0)),
    rule("hnorm.weight", Dim("hidden", 0)),
    rule("eh_proj.weight", Dim("hidden", 0), Dim("hidden", 1, 1, 2)),
    rule("post_norm.weight", Dim("hidden", 0)),
)


def _qk_norm_rules(config: Any) -> tuple[TensorRule, ...]:
    if getattr(config, "qk_norm", None) == "full":
        return (
            rule("self_attn.q_norm.weight", Dim("head", 0, "head_dim")),
            rule("self_attn.k_norm.weight", Dim("kv_head", 0, "head_dim")),
        )
    return ()


def _expert_widths(old: Any, new: Any, selection: dict) -> None:
    # `moe_intermediate_size` may be one width per decoder layer; the stored form keeps dense layers' entries at the
    # widest sparse width and collapses to one int when the sparse layers agree. MTP blocks are as wide as the widest
    # sparse decoder layer, so their selection must match that.
    from ..models.slim_moe.configuration_slim_moe import canonical_expert_widths

    new.moe_intermediate_size = canonical_expert_widths(new.moe_intermediate_size, new.mlp_layer_types)
    if not getattr(new, "num_mtp_heads", 0):
        return
    width = new.expert_intermediate_size(new.num_hidden_layers)
    per = selection.get("expert_ffn") or {}
    mtp = {blk: int(idx.shape[-1]) for blk, idx in per.items() if not blk.startswith("model.layers.")}
    for k in range(new.num_mtp_heads):
        blk = f"mtp.layers.{k}"
        kept = mtp.get(blk, old.expert_intermediate_size(old.num_hidden_layers))
        if kept != width:
            raise ValueError(
                f"expert_ffn: {blk} keeps {kept} expert FFN neurons, but MTP blocks take the widest sparse decoder "
                f"layer's moe_intermediate_size, {width} after this selection ({new.moe_intermediate_size}); give "
                f"{blk} {width} indices"
            )


def _routing_groups(old: Any, new: Any, selection: dict) -> None:
    # sigmoid routing in expert groups (GLM-4-MoE's): an expert selection keeps whole groups' worth, group by group
    n_group, per = getattr(old, "n_group", 1) or 1, selection.get("expert") or {}
    if n_group == 1 or not per:
        return
    kept = {blk: len(group_order(idx, old.num_experts, n_group, f"expert[{blk}]")) for blk, idx in per.items()}
    if len(set(kept.values())) > 1:
        raise ValueError(f"expert: n_group is one number for every layer, but the selection keeps groups {kept}")
    new.n_group = next(iter(kept.values()))


def _validate(config: Any) -> None:
    from ..models.slim_moe.configuration_slim_moe import check_routing

    check_routing(config)


def _hook(old: Any, new: Any, selection: dict) -> None:
    _routing_groups(old, new, selection)
    _expert_widths(old, new, selection)
    # Elastic variants are prefixes of the source's axes: a permutation keeps them meaningful to whoever re-ranks,
    # a shrink does not, so they are dropped as soon as any size changes.
    if getattr(old, "elastic", None) and any(getattr(old, f) != getattr(new, f) for f in AXIS_SIZE_FIELDS):
        new.elastic = None


SPEC = moe_spec(
    "slim_moe",
    global_rules=embedding_rules() + _mtp,
    shared_expert=True,
    dense_mlp=True,
    extra_block_rules=_mtp_block,
    block_containers=("model.layers", "mtp.layers"),
    layer_list_fields=("layer_types", "mlp_layer_types"),
    per_layer_fields=("moe_intermediate_size",),
    config_hook=_hook,
    validate=_validate,
    expert_groups="n_group",
    config_rules=_qk_norm_rules,
    stored_layout=IDENTITY_LAYOUT,  # SlimMoe stores its own state-dict names unchanged
)
