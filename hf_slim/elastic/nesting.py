"""Importance ordering (`make_elastic`) and slicing (`slice_variant`) through the anatomy axes specs.

Nesting is "sort each axis by importance once, then every variant is a prefix": `make_elastic` builds one
permutation per axis from the pruning calibration statistics and applies it with `hf_slim.anatomy.apply_selection`
(a permutation of hidden channels, heads, experts and FFN neurons leaves the outputs unchanged); `slice_variant`
applies the same `apply_selection` with prefix indices. Both plan from the model's structure and the statistics only
(`elastic_plan`, `variant_selection`), which is how `hf_slim.elastic.streaming` applies them to a checkpoint on disk.
"""

from __future__ import annotations

from typing import Any

import torch

from ..anatomy import apply_selection, expert_ffn_activations, get_spec, layers_with
from ..pruning import choose_layers, expert_importance, hidden_importance
from .config import FULL_VARIANT, ElasticConfig

__all__ = ["LAYER_METHODS", "elastic_plan", "importance_orders", "make_elastic", "slice_variant", "variant_selection"]

#: How a layer count becomes kept layers: `last` keeps the first layers (drops the last), `block_influence` keeps the
#: layers whose output differs most from their input (Minitron's BI, from the calibration statistics).
LAYER_METHODS = ("last", "block_influence")


def _descending(score: torch.Tensor) -> torch.Tensor:
    return torch.argsort(score.float(), dim=-1, descending=True, stable=True)


def _head_order(score: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Query heads ordered KV group by KV group (groups by summed importance), best heads first inside a group.

    A prefix of `k * group` heads is then `k` whole groups, which keeps grouped-query attention well defined.
    """
    group = score.numel() // num_kv_heads
    scores = score.float().view(num_kv_heads, group)
    groups = _descending(scores.sum(1))
    return torch.cat([g * group + _descending(scores[g]) for g in groups.tolist()])


def _check_model(model: Any) -> None:
    from ..models.slim_moe import SlimMoeForCausalLM

    if not isinstance(model, SlimMoeForCausalLM):
        raise TypeError(
            f"elastic variants live in SlimMoeForCausalLM models, got {type(model).__name__}; convert it first with "
            "hf_slim.convert.from_hf."
        )


def importance_orders(
    model: Any, statistics: Any, *, hidden_method: str = "slimqwen", expert_method: str = "reap"
) -> dict[str, Any]:
    """The importance-descending permutation of every axis, as an [`hf_slim.anatomy.Selection`].

    Args:
        model ([`SlimMoeForCausalLM`]): the full model.
        statistics ([`hf_slim.pruning.ImportanceStats`]): its calibration statistics (`collect_statistics`).
        hidden_method (`str`, defaults to `"slimqwen"`): `slimqwen` or `minitron` channel importance.
        expert_method (`str`, defaults to `"reap"`): `frequency`, `soft` or `reap` expert importance.

    Returns:
        `{"hidden": perm, "head": {block: perm}, "expert": {...}, "expert_ffn": {block: [E, I]}, "shared_ffn": {...},
        "ffn": {...}}` with indices of the source model (per-expert neuron orders indexed by source expert).
    """
    spec = get_spec(model)
    statistics.check_compatible(model.config)
    selection: dict[str, Any] = {"hidden": _descending(hidden_importance(statistics, hidden_method))}
    heads = statistics["head.out_norm"]
    selection["head"] = {
        key: _head_order(heads[i], model.config.num_key_value_heads) for i, key in layers_with(model, spec, "attn_out")
    }
    sparse = layers_with(model, spec, "experts")
    # sigmoid routing in expert groups: whole groups by summed importance, best experts first inside each (a
    # permutation that keeps every group together keeps the routing)
    groups = getattr(model.config, "n_group", 1) or 1
    selection["expert"] = {
        key: _head_order(expert_importance(statistics, i, expert_method), groups) for i, key in sparse
    }
    selection["expert_ffn"] = {key: _descending(act) for key, act in expert_ffn_activations(model, spec, statistics)}
    for axis, module, stat in (("shared_ffn", "shared_down", "shared_ffn.act"), ("ffn", "dense_down", "ffn.act")):
        blocks = layers_with(model, spec, module)
        if blocks:
            selection[axis] = {key: _descending(statistics[stat][i]) for i, key in blocks}
    return selection


def _resolve_layers(model: Any, elastic: ElasticConfig, statistics: Any, layer_method: str) -> ElasticConfig:
    if layer_method not in LAYER_METHODS:
        raise ValueError(f"layer_method={layer_method!r}: valid values are {list(LAYER_METHODS)}")
    if layer_method == "last":
        return elastic
    config = model.config
    variants = elastic.to_dict()["variants"]
    for fields in variants.values():
        count = fields.get("num_hidden_layers")
        if isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= config.num_hidden_layers:
            kept = choose_layers(config.num_hidden_layers, count, "block_influence", statistics, config.layer_types)
            fields["num_hidden_layers"] = kept.tolist()
    return ElasticConfig(variants=variants)


def make_elastic(
    model: Any,
    variants: ElasticConfig | dict[str, Any],
    statistics: Any,
    *,
    layer_method: str = "last",
    hidden_method: str = "slimqwen",
    expert_method: str = "reap",
) -> Any:
    """Reorder a SlimMoe model by importance so that every variant is a prefix along every axis.

    Hidden channels, attention heads (whole KV groups first), experts, each expert's FFN neurons, shared-expert and
    dense-FFN neurons are sorted by the calibration importance from `hf_slim.pruning` and permuted with
    `hf_slim.anatomy.apply_selection`, which leaves the full model's outputs unchanged. Layers keep their order;
    `layer_method` turns layer counts into kept layers.

    Args:
        model ([`SlimMoeForCausalLM`]): the full model (left untouched).
        variants ([`ElasticConfig`] or `dict`): the nested variants.
        statistics ([`hf_slim.pruning.ImportanceStats`]): calibration statistics of `model`.
        layer_method (`str`, defaults to `"last"`): see [`LAYER_METHODS`].
        hidden_method (`str`, defaults to `"slimqwen"`): hidden-channel importance (`slimqwen` or `minitron`).
        expert_method (`str`, defaults to `"reap"`): expert importance (`frequency`, `soft` or `reap`).

    Returns:
        A new `SlimMoeForCausalLM` with the permuted weights and `config.elastic` set to the (resolved) variants.

    Raises:
        `ValueError`: invalid or non-nested variants (naming the variant and the axis), statistics of another model.
    """
    _check_model(model)
    elastic, selection = elastic_plan(
        model, variants, statistics, layer_method=layer_method, hidden_method=hidden_method, expert_method=expert_method
    )
    ordered = apply_selection(model, selection)
    ordered.config.elastic = elastic.to_dict()
    return ordered


def elastic_plan(
    model: Any,
    variants: ElasticConfig | dict[str, Any],
    statistics: Any,
    *,
    layer_method: str = "last",
    hidden_method: str = "slimqwen",
    expert_method: str = "reap",
) -> tuple[ElasticConfig, dict[str, Any]]:
    """What [`make_elastic`] applies, from the model's structure and the statistics alone: the resolved variants and
    the importance permutation of every axis ([`importance_orders`]).

    `model` may be on the meta device (`hf_slim.elastic.make_elastic_checkpoint` plans from a model built from the
    checkpoint's config, then permutes the checkpoint tensor by tensor).

    Returns:
        `(variants, selection)`: the [`ElasticConfig`] stored as `config.elastic` (layer counts resolved to kept layers
        by `layer_method`) and the selection to apply.

    Raises:
        `ValueError`: no statistics, invalid or non-nested variants, statistics of another model.
    """
    if statistics is None:
        raise ValueError("statistics: make_elastic orders every axis by importance; pass collect_statistics(model, ...)")
    elastic = variants if isinstance(variants, ElasticConfig) else ElasticConfig.from_dict(variants)
    elastic = _resolve_layers(model, elastic, statistics, layer_method)
    elastic.validate(model.config)
    return elastic, importance_orders(model, statistics, hidden_method=hidden_method, expert_method=expert_method)


def variant_selection(model: Any, name: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The prefix [`hf_slim.anatomy.Selection`] of variant `name`. Only `model`'s config and modules are read, so a
    model on the meta device does (`hf_slim.elastic.slice_checkpoint` plans from one).

    Returns:
        `(selection, updates, dropped)`: the selection, non-axis config updates (`num_experts_per_tok`,
        `shared_expert_intermediate_size` when it drops to 0) and the tensor-name fragments of modules the variant
        does not have (the shared expert at width 0).
    """
    spec = get_spec(model)
    sizes = model.config.elastic_variant_sizes(name)
    variant = model.config.variant_config(name)
    kept = {layer: position for position, layer in enumerate(sizes["layers"])}

    def expert_width(key: int | str) -> int:
        # decoder layer `key` is the variant's layer kept[key]; every MTP block has the MTP width
        position = kept[key] if isinstance(key, int) else variant.num_hidden_layers
        return variant.expert_intermediate_size(position)

    def per_block(module: str, size: Any) -> dict[Any, torch.Tensor]:
        return {
            key: torch.arange(size(key) if callable(size) else size)
            for _, key in layers_with(model, spec, module)
            if not isinstance(key, int) or key in kept
        }

    selection: dict[str, Any] = {
        "layer": torch.tensor(sizes["layers"]),
        "hidden": torch.arange(sizes["hidden_size"]),
        "head": per_block("attn_out", sizes["num_attention_heads"]),
        "expert": per_block("experts", sizes["num_experts"]),
        "expert_ffn": per_block("experts", expert_width),
        "ffn": per_block("dense_down", sizes["intermediate_size"]),
    }
    updates: dict[str, Any] = {"num_experts_per_tok": sizes["num_experts_per_tok"]}
    dropped: list[str] = []
    if sizes["shared_expert_intermediate_size"] > 0:
        selection["shared_ffn"] = per_block("shared_down", sizes["shared_expert_intermediate_size"])
    elif model.config.shared_expert_intermediate_size > 0:
        updates["shared_expert_intermediate_size"] = 0
        dropped = [".mlp.shared_expert.", ".mlp.shared_expert_gate."]
    return {axis: value for axis, value in selection.items() if not isinstance(value, dict) or value}, updates, dropped


def slice_variant(model: Any, name: str) -> Any:
    """A standalone `SlimMoeForCausalLM` of variant `name` (prefix indices through `hf_slim.anatomy.apply_selection`).

    Its config equals `model.config.variant_config(name)`, so it stays elastic over the variants nested inside it,
    and its logits equal `model(..., elastic_variant=name)`. `model` is not modified.

    Raises:
        `KeyError`: unknown variant (listing the variants). `ValueError`: the model has no elastic variants.
    """
    _check_model(model)
    if name == FULL_VARIANT:
        model.config.elastic_variant_sizes(name)
    selection, updates, dropped = variant_selection(model, name)
    tensors = None
    if dropped:
        tensors = {k: v for k, v in model.state_dict().items() if not any(d in f".{k}" for d in dropped)}
    sliced = apply_selection(model, selection, tensors=tensors, updates=updates)
    sliced.config.elastic = model.config.variant_config(name).elastic
    return sliced
