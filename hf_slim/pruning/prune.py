"""`prune(model, PruneConfig, stats)`: score each axis, choose indices, apply one selection, rebuild."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .. import anatomy
from ..anatomy import SIZES, apply_selection, get_spec
from ..anatomy.core import source_tensors
from ..anatomy.mtp_blocks import attach_mtp_layers
from .config import PruneConfig
from .experts import (
    ExpertPlan,
    expert_importance,
    expert_similarity,
    merge_expert_rows,
    plan_experts,
)
from .mtp_layers import check_stats_blocks, checkpoint_mtp_layers, keep_mtp_layers
from .scores import (
    choose_expert_neurons,
    choose_heads,
    choose_hidden,
    choose_layers,
    choose_neurons,
)
from .stats import ImportanceStats

__all__ = ["ExpertMerge", "expert_merge_tensors", "plan_selection", "prune"]

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
# the fused expert tensors a merge averages (block-relative, under spec.modules["experts"])
_EXPERT_LEAVES = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertMerge:
    """One block's expert merge, decided by [`plan_selection`]: `plan.groups` lists the source experts averaged into
    each kept expert, weighted by `importance`. Applied to the block's fused expert tensors (`gate_up_proj`,
    `down_proj`) before the expert selection keeps `plan.kept`.
    """

    block: str
    plan: ExpertPlan
    importance: torch.Tensor

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """The fused experts tensor `weight` (`[num_experts, ...]`) with every merge group averaged into its target."""
        return merge_expert_rows(weight, self.plan, self.importance.to(weight.device))


def expert_merge_tensors(spec: Any, merges: dict[str, ExpertMerge] | None) -> dict[str, ExpertMerge]:
    """Tensor name -> the [`ExpertMerge`] to apply to it, for every fused experts tensor of a merged block."""
    return {
        f"{block}.{spec.modules['experts']}.{leaf}": merge
        for block, merge in (merges or {}).items()
        for leaf in _EXPERT_LEAVES
    }


def _router_weight(model: Any, spec: Any, block: str, tensors: Any) -> torch.Tensor:
    name = f"{block}.{spec.modules['router']}.weight"
    if tensors is not None:
        return tensors.read(name) if hasattr(tensors, "read") else tensors[name]
    weight = model.get_submodule(f"{block}.{spec.modules['router']}").weight
    if weight.device.type == "meta":
        raise ValueError(
            "merge_similarity='router_weight' reads the router weights, but the model is on the meta device; pass "
            "tensors= (a checkpoint reader) to plan_selection"
        )
    return weight


def _names(tensors: Any) -> list[str]:
    return list(tensors.names()) if hasattr(tensors, "names") else list(tensors)


def _coupled_shared(spec: Any, mc: Any) -> bool:
    """Whether the shared experts' width is no config field of its own (`n_shared_experts * moe_intermediate_size`)."""
    return "shared_ffn" in spec.axes() and getattr(mc, spec.field("shared_expert_intermediate_size"), None) is None


def _grouped_plan(imp: torch.Tensor, n_keep: int, strategy: str, sim: Any, groups: int, what: str) -> ExpertPlan:
    """[`plan_experts`] inside each of `groups` routing groups, the same number kept in each (merges stay inside)."""
    if n_keep % groups:
        raise ValueError(
            f"num_experts={n_keep}: {what} routes within n_group={groups} groups of experts; keep a multiple of "
            f"{groups} (the same number in every group)"
        )
    size, kept, merged = imp.numel() // groups, [], {}
    for g in range(groups):
        part = slice(g * size, (g + 1) * size)
        plan = plan_experts(imp[part], n_keep // groups, strategy, None if sim is None else sim[part, part])
        kept.append(plan.kept + g * size)
        merged.update({k + g * size: [m + g * size for m in v] for k, v in plan.groups.items()})
    return ExpertPlan(kept=torch.cat(kept), groups=merged)


def plan_selection(
    model: Any,
    config: PruneConfig,
    stats: ImportanceStats | None = None,
    *,
    tensors: Any = None,
    keep_mtp_decodable: bool | None = None,
) -> tuple[dict[str, Any], dict[str, ExpertMerge] | None, dict[str, Any], dict[str, Any]]:
    """Everything [`prune`] decides, without building the new model or touching the expert weights.

    Args:
        model: the source model, or only its structure: a model built on the meta device from the source config
            (`with torch.device("meta"): AutoModelForCausalLM.from_config(config)`).
        config ([`PruneConfig`]): target sizes and methods.
        stats ([`ImportanceStats`], optional): calibration statistics of the source model.
        tensors (optional): where the router weights come from when `merge_similarity="router_weight"`: a
            `hf_slim.checkpoints` reader, or a mapping of name -> tensor; defaults to the model's own weights. For a
            family storing MTP layers after its decoder layers, a structure without them gets them (on the meta
            device) where `tensors` holds them, and the selection covers them.
        keep_mtp_decodable (`bool`, *optional*): refuse a depth at which stock transformers no longer finds such
            MTP layers (they were found at the source's depth); with `False` they are renumbered to follow the kept
            layers all the same. `None` (default): `config.keep_mtp_decodable`.

    Returns:
        `(selection, merges, updates, report)`: the [`hf_slim.anatomy.Selection`]; the expert merges as
        `{block prefix: ExpertMerge}` (`None` when no experts merge), to apply to each block's fused expert tensors
        before the selection (see [`expert_merge_tensors`]); non-axis config updates (`num_experts_per_tok`); and a
        JSON-friendly report of the kept indices and merge groups.
    """
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
    spec = get_spec(model)
    mc = model.config
    if tensors is not None and spec.trailing_mtp is not None and all(p.is_meta for p in model.parameters()):
        attach_mtp_layers(model, _names(tensors), spec=spec)  # a structure gets the MTP layers the tensors hold
    coupled = _coupled_shared(spec, mc)
    if coupled and config.shared_expert_intermediate_size is not None:
        raise ValueError(
            f"shared_expert_intermediate_size={config.shared_expert_intermediate_size}: {mc.model_type} sizes its "
            "shared experts as n_shared_experts * moe_intermediate_size; prune them with moe_intermediate_size"
        )
    targets = config.resolve(mc, stats)
    if coupled and config.has_budget and config.moe_intermediate_size is None and "moe_intermediate_size" in targets:
        raise ValueError(
            f"moe_intermediate_size: the budget counted {mc.model_type}'s shared experts kept whole, but prune narrows "
            "them with the routed experts; set moe_intermediate_size yourself or leave it out of budget_axes"
        )
    needs_stats = any(k in targets for k in _NEEDS_STATS) or (
        "num_hidden_layers" in targets and config.depth_method == "block_influence"
    )
    if needs_stats:
        if stats is None:
            raise ValueError(f"stats: pruning {sorted(targets)} needs ImportanceStats (run collect_statistics)")
        stats.check_compatible(mc)
        if spec.trailing_mtp is not None:
            check_stats_blocks(model, spec, stats)
    sel: dict[str, Any] = {}
    updates: dict[str, Any] = {}
    report: dict[str, Any] = {"targets": targets}
    merges: dict[str, ExpertMerge] = {}

    if "num_hidden_layers" in targets:
        sel["layer"] = choose_layers(
            mc.num_hidden_layers,
            targets["num_hidden_layers"],
            config.depth_method,
            stats,
            getattr(mc, "layer_types", None),
        )
        report["layers"] = sel["layer"].tolist()
        keep = config.keep_mtp_decodable if keep_mtp_decodable is None else keep_mtp_decodable
        sel["layer"] = keep_mtp_layers(model, spec, sel["layer"], keep)
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
        blocks = spec.blocks(model)
        for i, key in sparse:
            block = blocks[i]
            imp = expert_importance(stats, i, imp_name)
            sim = None
            if strategy in ("merge", "partial_preserve"):
                router = None
                if config.merge_similarity == "router_weight":
                    router = _router_weight(model, spec, block, tensors)
                sim = expert_similarity(stats, i, config.merge_similarity, router)
            groups = (getattr(mc, spec.expert_groups, None) or 1) if spec.expert_groups else 1
            if groups > 1:
                plan = _grouped_plan(imp, n_keep, strategy, sim, groups, mc.model_type)
            else:
                plan = plan_experts(imp, n_keep, strategy, sim)
            sel["expert"][key] = plan.kept
            if plan.merges:
                merges[block] = ExpertMerge(block, plan, imp)
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
    if "moe_intermediate_size" in targets and coupled:  # the shared experts keep n_shared_experts * the width
        act = stats["shared_ffn.act"]
        blocks = spec.blocks(model)
        sel["shared_ffn"] = {}
        for i, k in anatomy.layers_with(model, spec, "shared_down"):
            down = model.get_submodule(f"{blocks[i]}.{spec.modules['shared_down']}")
            ratio = down.weight.shape[1] // mc.moe_intermediate_size
            sel["shared_ffn"][k] = choose_neurons(act[i], ratio * targets["moe_intermediate_size"])
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
    return sel, merges or None, updates, report


_AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def prune(
    model: Any,
    config: PruneConfig,
    stats: ImportanceStats | None = None,
    *,
    device_map: str | int | torch.device | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    keep_mtp_decodable: bool | None = None,
) -> Any:
    """Structurally prune a MoE causal LM; returns a new model of the SAME class (a stock model stays stock).

    The source may be loaded with `dtype=` and `device_map=` (`from_pretrained(..., device_map="auto")`, split
    over GPUs, the CPU and the disk by accelerate): its tensors are read through accelerate, and the pruned model
    keeps the source dtype. Where the pruned model goes:

    - `device_map=None` (default): a source on one device gives a model on that device; a source dispatched over
      several devices, or with offloaded modules, gives a model whole on the CPU (its layers are renumbered, so the
      source's map no longer applies).
    - `device_map="auto"` (or `"balanced"`, `"balanced_low_0"`, `"sequential"`) places it as `from_pretrained` would,
      within `max_memory`; a dict (module name -> device, `"cpu"` or `"disk"`) as given, in the pruned model's
      module names; a device (`"cuda:0"`, `0`, `"cpu"`) moves it there. Dispatched models get accelerate's hooks
      and `hf_device_map`, as from `from_pretrained`.

    Args:
        model ([`~transformers.PreTrainedModel`]): source model (left untouched).
        config ([`PruneConfig`]): target sizes and methods.
        stats ([`ImportanceStats`], optional): calibration statistics of `model` from
            [`collect_statistics`]; required unless only depth (`last`) or top-k changes.
        device_map (`str`, `int`, `torch.device` or `dict`, optional): where to put the pruned model (see above).
        max_memory (`dict`, optional): with an automatic `device_map`, the most memory per device
            (`{0: "20GiB", "cpu": "60GiB"}`), as in `from_pretrained`.
        offload_folder (`str` or `os.PathLike`, optional): where modules the `device_map` puts on `"disk"` go.
        keep_mtp_decodable (`bool`, *optional*): for GLM-4-MoE and DeepSeek-V3, whose checkpoints store MTP
            layers after the decoder layers (attached from `model.name_or_path` for the call, and carried into the
            pruned model): refuse a depth at which stock transformers no longer finds them (see [`plan_selection`]).
            `None` (default): `config.keep_mtp_decodable`.

    Returns:
        The pruned model. Router rows, biases, norms and config fields follow the kept indices; what was chosen is
        in `model.hf_slim_pruning_report` (kept layers, experts, merge groups).

    Raises:
        `ValueError`: targets larger than the source, top-k above the expert count, head counts that do not divide,
            a hidden size the architecture cannot hold, statistics from another model, weights on the meta device
            that no accelerate hook holds, or a `device_map` with `"disk"` but no `offload_folder`.

    Example:
        ```python
        >>> model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, device_map="auto")
        >>> stats = collect_statistics(model, texts, tokenizer=tok, num_samples=256, max_length=1024)
        >>> small = prune(model, PruneConfig(num_experts=0.5, num_experts_per_tok=4, hidden_size=0.75), stats)
        ```
    """
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("max_memory and offload_folder place the pruned model; pass device_map= with them")
    with checkpoint_mtp_layers(model):  # GLM-4-MoE / DeepSeek-V3: the checkpoint's MTP layers come along
        new, report = _prune(model, config, stats, keep_mtp_decodable)
    if device_map is not None:
        new = _place(new, device_map, max_memory, offload_folder)
    new.hf_slim_pruning_report = report
    return new


def _prune(model: Any, config: PruneConfig, stats: Any, keep_mtp_decodable: bool | None) -> tuple[Any, dict[str, Any]]:
    tensors = source_tensors(model)  # real tensors, on the CPU when the model is dispatched or offloaded
    missing = [name for name, t in tensors.items() if t.device.type == "meta"]
    if missing:
        raise ValueError(
            f"{missing[0].rpartition('.')[0]}: its weights are on the meta device and no accelerate hook loads "
            "them; load the model with its weights (from_pretrained, with device_map= to offload) or prune the "
            "checkpoint with hf_slim.pruning.prune_checkpoint(path, ...)"
        )
    sel, merges, updates, report = plan_selection(
        model, config, stats, tensors=tensors, keep_mtp_decodable=keep_mtp_decodable
    )
    if merges:
        tensors = dict(tensors)
        for name, merge in expert_merge_tensors(get_spec(model), merges).items():
            tensors[name] = merge.apply(tensors[name])
    return apply_selection(model, sel, tensors=tensors, updates=updates), report


def _place(model: Any, device_map: Any, max_memory: Any, offload_folder: Any) -> Any:
    """Move or dispatch the pruned model as `prune(device_map=...)` asks."""
    if isinstance(device_map, (int, torch.device)) or (isinstance(device_map, str) and device_map not in _AUTO_MAPS):
        if max_memory is not None or offload_folder is not None:
            raise ValueError(
                f"device_map={device_map!r} is one device; max_memory and offload_folder apply to a dict or an "
                "automatic device_map"
            )
        return model.to(torch.device(device_map) if isinstance(device_map, int) else device_map)
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        # never split a block: its residual stream must stay on one device (what _no_split_modules says in HF)
        blocks = sorted({type(model.get_submodule(b)).__name__ for b in get_spec(model).blocks(model)})
        if device_map != "sequential":
            max_memory = get_balanced_memory(
                model, max_memory=max_memory, no_split_module_classes=blocks, low_zero=device_map == "balanced_low_0"
            )
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=blocks)
    elif not isinstance(device_map, dict):
        raise TypeError(
            f"device_map must be a device, one of {list(_AUTO_MAPS)} or a dict of module name -> device, got "
            f"{type(device_map).__name__}"
        )
    disk = sorted(name for name, device in device_map.items() if device == "disk")
    if disk and offload_folder is None:
        raise ValueError(f"device_map puts {disk} on the disk; pass offload_folder= (a folder for their weights)")
    return dispatch_model(model, device_map, offload_dir=offload_folder)
