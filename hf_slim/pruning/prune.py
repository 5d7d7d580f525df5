"""`prune(model, PruneConfig, stats)`: score each axis, choose indices, apply one selection, rebuild."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .. import anatomy
from ..anatomy import SIZES, apply_selection, get_spec
from .config import PruneConfig
from .experts import (
    expert_importance,
    expert_similarity,
    merge_expert_rows,
    plan_experts,
)
from .scores import (
    choose_expert_neurons,
    choose_heads,
    choose_hidden,
    choose_layers,
    choose_neurons,
)
from .stats import ImportanceStats

__all__ = ["prune", "plan_selection"]

_MOVED_TO_ANATOMY = ("layers_with", "expert_ffn_activations")


def __getattr__(name: str) -> Any:
    # `layers_with` / `expert_ffn_activations` answer questions about the spec and moved to hf_slim.anatomy
    if name in _MOVED_TO_ANATOMY:
        warnings.warn(
            f"hf_slim.pruning.prune.{name} moved to hf_slim.anatomy.{name}; import it from there",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(anatomy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Every axis but depth (which `last` drops without scores) and top-k is chosen by calibration importance.
_NEEDS_STATS = tuple(f.name for f in SIZES if f.axis not in (None, "layer"))


def plan_selection(
    model: Any, config: PruneConfig, stats: ImportanceStats | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict[str, Any], dict[str, Any]]:
    """Everything [`prune`] decides, without building the new model.

    Returns:
        `(selection, tensors, updates, report)`: the [`hf_slim.anatomy.Selection`]; replacement source tensors when
        experts were merged (else `None`); non-axis config updates (`num_experts_per_tok`); and a JSON-friendly
        report of the kept indices and merge groups.
    """
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
    spec = get_spec(model)
    mc = model.config
    targets = config.resolve(mc)
    needs_stats = any(k in targets for k in _NEEDS_STATS) or (
        "num_hidden_layers" in targets and config.depth_method == "block_influence"
    )
    if needs_stats:
        if stats is None:
            raise ValueError(f"stats: pruning {sorted(targets)} needs ImportanceStats (run collect_statistics)")
        stats.check_compatible(mc)
    sel: dict[str, Any] = {}
    updates: dict[str, Any] = {}
    report: dict[str, Any] = {"targets": targets}
    tensors: dict[str, torch.Tensor] | None = None

    if "num_hidden_layers" in targets:
        sel["layer"] = choose_layers(
            mc.num_hidden_layers,
            targets["num_hidden_layers"],
            config.depth_method,
            stats,
            getattr(mc, "layer_types", None),
        )
        report["layers"] = sel["layer"].tolist()
    if "hidden_size" in targets:
        sel["hidden"] = choose_hidden(stats, targets["hidden_size"], config.hidden_method)
    if "num_attention_heads" in targets or "num_key_value_heads" in targets:
        heads = targets.get("num_attention_heads", mc.num_attention_heads)
        kv = targets.get("num_key_value_heads", mc.num_key_value_heads)
        scores = stats["head.out_norm"]
        attn = anatomy.layers_with(model, spec, "attn_out")
        sel["head"] = {k: choose_heads(scores[i], mc.num_key_value_heads, heads, kv) for i, k in attn}
    sparse = anatomy.layers_with(model, spec, "experts")
    if "num_experts" in targets:
        n_keep = targets["num_experts"]
        strategy = config.expert_strategy
        imp_name = strategy if strategy in ("frequency", "soft", "reap") else config.merge_importance
        sel["expert"] = {}
        groups_report: dict[int | str, dict[int, list[int]]] = {}  # decoder layer index, or "mtp.layers.N"
        for i, key in sparse:
            block = spec.blocks(model)[i]
            imp = expert_importance(stats, i, imp_name)
            sim = None
            if strategy in ("merge", "partial_preserve"):
                router = model.get_submodule(f"{block}.{spec.modules['router']}").weight
                sim = expert_similarity(stats, i, config.merge_similarity, router)
            plan = plan_experts(imp, n_keep, strategy, sim)
            sel["expert"][key] = plan.kept
            if plan.merges:
                if tensors is None:
                    tensors = dict(model.state_dict())
                prefix = f"{block}.{spec.modules['experts']}"
                for leaf in ("gate_up_proj", "down_proj"):
                    tensors[f"{prefix}.{leaf}"] = merge_expert_rows(tensors[f"{prefix}.{leaf}"], plan, imp)
                groups_report[key] = {k: v for k, v in plan.groups.items() if len(v) > 1}
        report["experts"] = {i: t.tolist() for i, t in sel["expert"].items()}
        if groups_report:
            report["merges"] = groups_report
    if "num_experts_per_tok" in targets:
        updates["num_experts_per_tok"] = targets["num_experts_per_tok"]
    if "moe_intermediate_size" in targets:
        sel["expert_ffn"] = {
            k: choose_expert_neurons(act, targets["moe_intermediate_size"])
            for k, act in anatomy.expert_ffn_activations(model, spec, stats)
        }
    if "shared_expert_intermediate_size" in targets:
        act = stats["shared_ffn.act"]
        layers = anatomy.layers_with(model, spec, "shared_down")
        sel["shared_ffn"] = {k: choose_neurons(act[i], targets["shared_expert_intermediate_size"]) for i, k in layers}
    if "intermediate_size" in targets:
        layers = anatomy.layers_with(model, spec, "dense_down")
        if not layers:
            raise ValueError(f"intermediate_size={targets['intermediate_size']}: the model has no dense FFN layer")
        act = stats["ffn.act"]
        sel["ffn"] = {k: choose_neurons(act[i], targets["intermediate_size"]) for i, k in layers}
    return sel, tensors, updates, report


def prune(model: Any, config: PruneConfig, stats: ImportanceStats | None = None) -> Any:
    """Structurally prune a MoE causal LM; returns a new model of the SAME class (a stock model stays stock).

    Args:
        model ([`~transformers.PreTrainedModel`]): source model (left untouched).
        config ([`PruneConfig`]): target sizes and methods.
        stats ([`ImportanceStats`], optional): calibration statistics of `model` from
            [`collect_statistics`]; required unless only depth (`last`) or top-k changes.

    Returns:
        The pruned model. Router rows, biases, norms and config fields follow the kept indices; what was chosen is
        in `model.hf_slim_pruning_report` (kept layers, experts, merge groups).

    Raises:
        `ValueError`: targets larger than the source, top-k above the expert count, head counts that do not divide,
            a hidden size the architecture cannot hold, or statistics from another model.

    Example:
        ```python
        >>> stats = collect_statistics(model, texts, tokenizer=tok, num_samples=256, max_length=1024)
        >>> small = prune(model, PruneConfig(num_experts=0.5, num_experts_per_tok=4, hidden_size=0.75), stats)
        ```
    """
    sel, tensors, updates, report = plan_selection(model, config, stats)
    new = apply_selection(model, sel, tensors=tensors, updates=updates)
    new.hf_slim_pruning_report = report
    return new

