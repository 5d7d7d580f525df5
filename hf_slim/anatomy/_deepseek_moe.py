"""What the DeepSeek-style MoE families (`deepseek_v3`, `glm4_moe`) share: the first `first_k_dense_replace` layers
dense, shared experts sized `n_shared_experts * moe_intermediate_size`, sigmoid routing with a score-correction bias
inside `n_group` expert groups, and MTP layers stored after the decoder layers.

- Shared experts: their width is no config field of its own. A selection keeping `S` shared-expert neurons and `I`
  neurons per routed expert is held exactly as `moe_intermediate_size = I`, `n_shared_experts = S / I`; `S` must be a
  multiple of `I`.
- Expert groups: the router views the experts as `n_group` consecutive groups, scores each group by its two best
  experts and routes within the best `topk_group`. An expert selection keeps the same number of experts in every kept
  group, listed group by group (the chunks of the selection are the new groups; whole groups may go), at least two per
  group; `num_experts_per_tok` must fit in `topk_group` groups.
- Dense layers come first: a `layer` selection keeps them ahead of the sparse ones and `first_k_dense_replace`
  counts them.
"""

from __future__ import annotations

from typing import Any

import torch

from ._rules import DEFAULT_MODULES, rule
from .core import Dim, TensorRule
from .mtp_blocks import TrailingMtp

__all__ = ["MODULES", "MTP_RULES", "SHARED_EXPERT_RULES", "TRAILING_MTP", "config_hook", "validate"]

SHARED_EXPERT_RULES: tuple[TensorRule, ...] = (
    rule("mlp.shared_experts.gate_proj.weight", Dim("shared_ffn", 0), Dim("hidden", 1)),
    rule("mlp.shared_experts.up_proj.weight", Dim("shared_ffn", 0), Dim("hidden", 1)),
    rule("mlp.shared_experts.down_proj.weight", Dim("hidden", 0), Dim("shared_ffn", 1)),
)

#: The modules an MTP layer holds beside its decoder block (block-relative, they match MTP layers only).
MTP_RULES: tuple[TensorRule, ...] = (
    rule("enorm.weight", Dim("hidden", 0)),
    rule("hnorm.weight", Dim("hidden", 0)),
    # input cat[enorm(embedding), hnorm(hidden)]: the hidden axis twice
    rule("eh_proj.weight", Dim("hidden", 0), Dim("hidden", 1, 1, 2)),
    rule("shared_head.norm.weight", Dim("hidden", 0)),
    rule("shared_head.head.weight", Dim("hidden", 1)),
    rule("embed_tokens.weight", Dim("hidden", 1)),
)

MODULES = {**DEFAULT_MODULES, "shared_down": "mlp.shared_experts.down_proj"}
TRAILING_MTP = TrailingMtp()
_SHARED = "shared_expert_intermediate_size"  # the canonical size select_config writes; no field of these configs


def _dense_first(old: Any, new: Any, kept: list[int]) -> None:
    dense = [i < (old.first_k_dense_replace or 0) for i in kept if i < old.num_hidden_layers]
    if dense != sorted(dense, reverse=True):
        raise ValueError(
            f"layer: {old.model_type} builds its first first_k_dense_replace layers dense, so the kept dense layers "
            f"must come before the kept sparse ones, got {kept}"
        )
    new.first_k_dense_replace = sum(dense)


def _shared_width(old: Any, new: Any, selection: dict) -> None:
    if _SHARED in vars(new):
        delattr(new, _SHARED)
    if not old.n_shared_experts:
        return
    width = new.moe_intermediate_size
    shared = {int(t.numel()) for t in (selection.get("shared_ffn") or {}).values()}
    kept = shared.pop() if shared else old.moe_intermediate_size * old.n_shared_experts
    if kept % width:
        raise ValueError(
            f"shared_ffn: {old.model_type} sizes its shared experts as n_shared_experts * moe_intermediate_size, so "
            f"the {kept} shared-expert neurons kept must be a multiple of the {width} neurons kept per routed expert"
        )
    new.n_shared_experts = kept // width


def group_order(idx: torch.Tensor, num_experts: int, num_groups: int, what: str) -> list[int]:
    """The source groups of an expert selection, in kept order: the selection cut into equal chunks, one per kept
    group; raises `ValueError` (one sentence) when it does not keep the same number per group, group by group."""
    if num_experts % num_groups:
        raise ValueError(f"{what}: n_routed_experts={num_experts} is not a multiple of n_group={num_groups}")
    size = num_experts // num_groups
    groups = (idx // size).tolist()
    order = list(dict.fromkeys(groups))
    chunk = len(groups) // len(order)
    if chunk * len(order) != len(groups) or any(
        set(groups[c * chunk : (c + 1) * chunk]) != {g} for c, g in enumerate(order)
    ):
        raise ValueError(
            f"{what}: experts {idx.tolist()} do not keep the same number in each of the kept routing groups "
            f"(n_group={num_groups}, {size} experts each), listed group by group"
        )
    return order


def _expert_groups(old: Any, new: Any, selection: dict) -> None:
    per = selection.get("expert") or {}
    n_group = old.n_group or 1
    kept = {blk: len(group_order(idx, old.n_routed_experts, n_group, f"expert[{blk}]")) for blk, idx in per.items()}
    if len(set(kept.values())) > 1:
        raise ValueError(f"expert: n_group is one number for every layer, but the selection keeps groups {kept}")
    if kept:
        new.n_group = next(iter(kept.values()))


def config_hook(old: Any, new: Any, selection: dict) -> None:
    """The config rules of the DeepSeek-style families (see the module docstring)."""
    if "layer" in selection:
        _dense_first(old, new, selection["layer"].tolist())
    _shared_width(old, new, selection)
    _expert_groups(old, new, selection)


def validate(config: Any) -> None:
    """Raise `ValueError` when the grouped router cannot run with `config`'s expert counts."""
    n_group, topk_group = config.n_group or 1, config.topk_group or 1
    experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    size = experts // n_group
    if experts % n_group or size < 2:
        raise ValueError(
            f"num_experts={experts}: the router scores each of the n_group={n_group} groups by its two best experts, "
            "so every group needs at least two experts"
        )
    if topk_group > n_group:
        raise ValueError(f"n_group={n_group}: fewer routing groups than topk_group={topk_group}; keep more groups")
    if top_k > topk_group * size:
        raise ValueError(
            f"num_experts_per_tok={top_k}: routing reaches only topk_group * experts per group = {topk_group} * "
            f"{size} experts; lower num_experts_per_tok or keep more experts per group"
        )
