# Copyright 2026 The hf-slim developers. Licensed under the Apache License, Version 2.0.
"""SlimMoe elastic variants: the arithmetic of nested sizes.

Validating `config.elastic`, resolving each variant to explicit sizes, checking that variants nest, deriving a
variant's own config, and the per-variant plan the modeling code computes with. Plain Python on config objects: no
torch. This file is copied next to the weights by `hf_slim.hub.save_for_hub`, so it imports nothing from hf_slim.
"""

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from .configuration_slim_moe import SlimMoeConfig


#: Config fields an elastic variant may set; every one is an axis that nests (a prefix of the full model's)
#: except `num_experts_per_tok`, which only has to fit the variant's own `num_experts`.
ELASTIC_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "intermediate_size",
)
#: The axes compared when checking that variants nest (layers compare as sets of kept layer indices).
ELASTIC_NESTED_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_experts",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "intermediate_size",
)
FULL_VARIANT = "full"


# ---- the plan one variant computes with ----------------------------------------------------------------------------
# A variant keeps a prefix of every axis (make_elastic orders each axis by importance first), so the modules compute
# it with slices of their own parameters: no copies, and gradients land in the shared tensors.


@dataclass(frozen=True)
class SlimMoeElasticSizes:
    """Sizes one block computes with while an elastic variant is active (widths in elements, not heads)."""

    hidden: int
    q_width: int
    kv_width: int
    num_experts: int
    top_k: int
    expert_ffn: int
    shared_ffn: int
    ffn: int
    cache_index: int


@dataclass(frozen=True, eq=False)
class SlimMoeVariantPlan:
    """Everything a forward pass needs to compute as one nested variant, built once per variant (see
    `build_variant_plan`) and read-only after that.

    Args:
        name (`str`): the variant's name in `config.elastic`.
        layers (`tuple[int, ...]`): the decoder layers it keeps, as indices of the full model, in order.
        hidden (`int`): its residual-stream width (a prefix of the full model's).
        config (`SlimMoeConfig`): its own config (`variant_config(name)`): the KV-cache layout and router sizes.
        blocks (`tuple[SlimMoeElasticSizes, ...]`): the sizes of each kept decoder layer, aligned with `layers`.
        mtp_blocks (`tuple[SlimMoeElasticSizes, ...]`): the sizes of each MTP depth's block (its KV slot in an
            `MtpCache` is its depth, 0-based).
    """

    name: str
    layers: tuple[int, ...]
    hidden: int
    config: "SlimMoeConfig"
    blocks: tuple[SlimMoeElasticSizes, ...]
    mtp_blocks: tuple[SlimMoeElasticSizes, ...]


def build_variant_plan(config: "SlimMoeConfig", name: str) -> SlimMoeVariantPlan:
    """The `SlimMoeVariantPlan` of variant `name` of the full model `config` (errors as `elastic_variant_sizes`)."""
    sizes = variant_sizes(config, name)
    variant = build_variant_config(config, name)
    head_dim = config.head_dim

    def block(position: int, cache_index: int) -> SlimMoeElasticSizes:
        # `position` numbers the variant's own blocks: its decoder layers, then MTP block k at num_hidden_layers + k
        return SlimMoeElasticSizes(
            hidden=sizes["hidden_size"],
            q_width=sizes["num_attention_heads"] * head_dim,
            kv_width=sizes["num_key_value_heads"] * head_dim,
            num_experts=sizes["num_experts"],
            top_k=sizes["num_experts_per_tok"],
            expert_ffn=variant.expert_intermediate_size(position),
            shared_ffn=sizes["shared_expert_intermediate_size"],
            ffn=sizes["intermediate_size"],
            cache_index=cache_index,
        )

    layers = tuple(sizes["layers"])
    n_kept = len(layers)
    return SlimMoeVariantPlan(
        name=name,
        layers=layers,
        hidden=sizes["hidden_size"],
        config=variant,
        # a variant numbers its cache layers 0..n-1 over the layers it keeps
        blocks=tuple(block(position, position) for position in range(n_kept)),
        mtp_blocks=tuple(block(n_kept + k, k) for k in range(config.num_mtp_heads)),
    )


# ---- variant sizes and configs -------------------------------------------------------------------------------------
def variant_names(config: "SlimMoeConfig") -> list[str]:
    """See `SlimMoeConfig.elastic_variant_names`."""
    resolved = resolve_elastic_variants(config.elastic, config) if config.elastic else {}
    return [*resolved, FULL_VARIANT]


def variant_sizes(config: "SlimMoeConfig", name: str) -> dict[str, Any]:
    """See `SlimMoeConfig.elastic_variant_sizes`."""
    if name == FULL_VARIANT:
        return _full_sizes(config)
    if not config.elastic:
        raise ValueError(
            f"elastic_variant={name!r}: this SlimMoeConfig has no elastic variants (config.elastic is None); "
            "build them with hf_slim.elastic.make_elastic, or use elastic_variant='full'."
        )
    resolved = resolve_elastic_variants(config.elastic, config)
    if name not in resolved:
        raise KeyError(f"elastic_variant={name!r} is not a variant of this model; variants: {[*resolved, FULL_VARIANT]}")
    return resolved[name]


def build_variant_config(config: "SlimMoeConfig", name: str) -> "SlimMoeConfig":
    """See `SlimMoeConfig.variant_config`."""
    sizes = variant_sizes(config, name)
    data = config.to_dict()
    layers = sizes["layers"]
    for key in ELASTIC_FIELDS:
        data[key] = sizes[key]
    data["head_dim"] = config.head_dim
    data["layer_types"] = [config.layer_types[i] for i in layers]
    data["mlp_layer_types"] = [config.mlp_layer_types[i] for i in layers]
    nested = {}
    if config.elastic and name != FULL_VARIANT:
        for other, other_sizes in resolve_elastic_variants(config.elastic, config).items():
            if other != name and _fits(other_sizes, sizes) and not _same(other_sizes, sizes):
                nested[other] = _relative(other_sizes, sizes)
    elif config.elastic:
        nested = copy.deepcopy(config.elastic.get("variants", {}))
    extra = {k: copy.deepcopy(v) for k, v in (config.elastic or {}).items() if k != "variants"}
    data["elastic"] = {**extra, "variants": nested} if nested else None
    for key in ("model_type", "transformers_version"):
        data.pop(key, None)
    return type(config)(**data)


def canonical_expert_widths(widths: int | list[int], mlp_layer_types: list[str] | None) -> int | list[int]:
    """The stored form of per-layer expert widths: one int when every sparse layer has the same width, else the list
    with the entries of dense layers (which have no experts) set to the widest sparse layer's width."""
    if not isinstance(widths, list):
        return widths
    types = mlp_layer_types or ["sparse"] * len(widths)
    sparse = [w for w, kind in zip(widths, types) if kind == "sparse"]
    if len(set(sparse or widths)) == 1:
        return (sparse or widths)[0]
    if not sparse:
        return max(widths)
    widest = max(sparse)
    return [w if kind == "sparse" else widest for w, kind in zip(widths, types)]


def _full_sizes(config: Any) -> dict[str, Any]:
    sizes = {key: getattr(config, key) for key in ELASTIC_FIELDS}
    sizes["layers"] = list(range(config.num_hidden_layers))
    return sizes


def _fits(small: dict, large: dict) -> bool:
    """Whether `small` lies inside `large` on every nested axis (a size of `None` means the full model's)."""
    for key in ELASTIC_NESTED_FIELDS:
        if key == "num_hidden_layers":
            if large["layers"] is not None and (
                small["layers"] is None or not set(small["layers"]) <= set(large["layers"])
            ):
                return False
        elif key == "moe_intermediate_size":
            if large[key] is not None and (
                small[key] is None or any(a > b for _, a, b in _width_pairs(small, large))
            ):
                return False
        elif large[key] is not None and (small[key] is None or small[key] > large[key]):
            return False
    return True


def _width_pairs(a: dict, b: dict) -> list[tuple[int | None, Any, Any]]:
    """`(layer, width in a, width in b)` of the expert FFN on the layers both keep (`layer` None for two ints);
    a width of `None` (the full model's, unknown without a base config) compares as infinite."""
    va, vb = a["moe_intermediate_size"], b["moe_intermediate_size"]
    inf = float("inf")
    if not isinstance(va, list) and not isinstance(vb, list):
        return [(None, inf if va is None else va, inf if vb is None else vb)]
    la, lb = a["layers"], b["layers"]
    if la is not None and lb is not None:
        common = sorted(set(la) & set(lb))
    else:
        common = la if la is not None else lb
        if common is None:
            common = range(len(va if isinstance(va, list) else vb))

    def at(value: Any, layers: list[int] | None, layer: int) -> Any:
        if not isinstance(value, list):
            return inf if value is None else value
        position = layer if layers is None else layers.index(layer)
        return value[position] if position < len(value) else None

    pairs = [(layer, at(va, la, layer), at(vb, lb, layer)) for layer in common]
    return [(layer, x, y) for layer, x, y in pairs if x is not None and y is not None]


def _same(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ELASTIC_FIELDS) and list(a["layers"]) == list(b["layers"])


def _relative(small: dict, large: dict) -> dict[str, Any]:
    """`small`'s fields as a variant of `large` (layer indices renumbered to `large`'s kept layers)."""
    out: dict[str, Any] = {}
    positions = [large["layers"].index(i) for i in small["layers"]]
    if positions != list(range(len(large["layers"]))):
        out["num_hidden_layers"] = len(positions) if positions == list(range(len(positions))) else positions
    for key in ELASTIC_FIELDS[1:]:
        if small[key] != large[key]:
            out[key] = small[key]
    return out


def _int_field(variant: str, key: str, value: Any, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"elastic variant {variant!r}: {key} must be an integer, got {value!r}.")
    if value < low or (high is not None and value > high):
        where = f"between {low} and the full model's {high}" if high is not None else f">= {low}"
        raise ValueError(f"elastic variant {variant!r}: {key}={value} is out of range; it must be {where}.")
    return value


def resolve_elastic_variants(elastic: Any, base: Any = None) -> dict[str, dict[str, Any]]:
    """Validate an `elastic` dict and resolve every variant to explicit sizes, smallest first.

    Args:
        elastic (`dict`): `{"variants": {name: {field: size}}}` with fields from `ELASTIC_FIELDS`;
            `num_hidden_layers` is a count (the first layers) or a sorted list of kept layer indices.
        base (`SlimMoeConfig`, *optional*): the full model. Without it, missing fields mean "as the full model" and
            only the checks that need no full model are run.

    Returns:
        `{name: sizes}` as in `SlimMoeConfig.elastic_variant_sizes`; sizes not given are the full model's (or `None`
        without `base`).

    Raises:
        `ValueError`: naming the variant and the field: unknown field, size out of range, head counts that do not keep
            whole KV groups, top-k above the variant's experts, or two variants that do not nest.
    """
    if not isinstance(elastic, dict) or not isinstance(elastic.get("variants"), dict):
        raise ValueError(
            f"SlimMoeConfig.elastic must be a dict like {{'variants': {{'small': {{'hidden_size': 512}}}}}}, "
            f"got {elastic!r}."
        )
    full = _full_sizes(base) if base is not None else dict.fromkeys(ELASTIC_FIELDS)
    group = base.num_attention_heads // base.num_key_value_heads if base is not None else None
    resolved: dict[str, dict[str, Any]] = {}
    for name, fields in elastic["variants"].items():
        if not isinstance(name, str) or not name or name == FULL_VARIANT:
            raise ValueError(f"elastic variant name {name!r} is invalid: use a non-empty string other than 'full'.")
        if not isinstance(fields, dict):
            raise ValueError(f"elastic variant {name!r} must map config fields to sizes, got {fields!r}.")
        unknown = sorted(set(fields) - set(ELASTIC_FIELDS))
        if unknown:
            raise ValueError(f"elastic variant {name!r}: unknown field(s) {unknown}; valid fields: {list(ELASTIC_FIELDS)}.")
        sizes = {key: fields.get(key, full[key]) for key in ELASTIC_FIELDS}
        layers = sizes["num_hidden_layers"]
        n_full = full["num_hidden_layers"]
        if isinstance(layers, (list, tuple)):
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers) or any(
                b <= a for a, b in zip(layers, layers[1:])
            ) or layers[0] < 0 or (n_full is not None and layers[-1] >= n_full):
                raise ValueError(
                    f"elastic variant {name!r}: num_hidden_layers={list(layers)} must be a count or a non-empty, "
                    f"strictly increasing list of layer indices in [0, {n_full})."
                )
            sizes["layers"] = list(layers)
        elif layers is not None:
            _int_field(name, "num_hidden_layers", layers, 1, n_full)
            sizes["layers"] = list(range(layers))
        else:
            sizes["layers"] = None
        if sizes["layers"] is not None:
            sizes["num_hidden_layers"] = len(sizes["layers"])
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_experts"):
            if sizes[key] is not None:
                _int_field(name, key, sizes[key], 1, full[key])
        groups = getattr(base, "n_group", 1) if base is not None else 1
        if groups > 1 and sizes["num_experts"] != full["num_experts"]:
            raise ValueError(
                f"elastic variant {name!r}: num_experts={sizes['num_experts']} cannot be a variant of a model that "
                f"routes within n_group={groups} expert groups (router_scoring='sigmoid'): a prefix of the experts "
                "does not keep the groups; leave num_experts at the full model's."
            )
        sizes["moe_intermediate_size"] = _resolve_expert_widths(
            name, sizes, full, "moe_intermediate_size" in fields, base
        )
        for key in ("shared_expert_intermediate_size", "intermediate_size"):
            if sizes[key] is not None:
                _int_field(name, key, sizes[key], 0 if key.startswith("shared") else 1, full[key])
        _resolve_heads(name, fields, sizes, full, group)
        top_k, experts = sizes["num_experts_per_tok"], sizes["num_experts"]
        if top_k is not None:
            _int_field(name, "num_experts_per_tok", top_k, 1, None)
            if experts is not None and top_k > experts:
                raise ValueError(
                    f"elastic variant {name!r}: num_experts_per_tok={top_k} is larger than the variant's "
                    f"num_experts={experts}; give the variant a num_experts_per_tok between 1 and {experts}."
                )
        resolved[name] = sizes
    names = list(resolved)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            _check_nested(a, resolved[a], b, resolved[b])
    order = sorted(names, key=lambda n: sum(1 for m in names if m != n and _fits(resolved[m], resolved[n]) and not _fits(resolved[n], resolved[m])))
    return {n: resolved[n] for n in order}


def _resolve_expert_widths(name: str, sizes: dict, full: dict, given: bool, base: Any) -> Any:
    """A variant's `moe_intermediate_size` (an int, or one int per kept layer) checked against the full model and
    brought to the stored form of `canonical_expert_widths`."""
    key, value, layers = "moe_intermediate_size", sizes["moe_intermediate_size"], sizes["layers"]
    full_widths = full[key]
    types = list(base.mlp_layer_types) if base is not None else None
    if not given and isinstance(full_widths, list) and layers is not None:
        value = [full_widths[i] for i in layers]
    if value is None:
        return None

    def full_at(layer: int | None) -> int | None:
        if full_widths is None or not isinstance(full_widths, list):
            return full_widths
        return full_widths[layer] if layer is not None else None

    def sparse(layer: int | None) -> bool:
        return types is None or layer is None or types[layer] == "sparse"

    if isinstance(value, list):
        if not value or any(isinstance(w, bool) or not isinstance(w, int) for w in value):
            raise ValueError(
                f"elastic variant {name!r}: {key}={value!r} must be an integer or a non-empty list of integers, one "
                "per kept layer."
            )
        if layers is not None and len(value) != len(layers):
            raise ValueError(
                f"elastic variant {name!r}: {key} has {len(value)} entries but the variant keeps {len(layers)} "
                f"layers {layers}; give one integer, or one per kept layer."
            )
        for position, width in enumerate(value):
            layer = layers[position] if layers is not None else None
            high = full_at(layer) if sparse(layer) else None
            if width < 1 or (high is not None and width > high):
                where = f" (layer {layer})" if layer is not None else ""
                bound = f"between 1 and the full model's {high}" if high is not None else ">= 1"
                raise ValueError(
                    f"elastic variant {name!r}: {key}[{position}]={width}{where} is out of range; it must be {bound}."
                )
        return canonical_expert_widths(value, [types[i] for i in layers] if types and layers is not None else None)
    if isinstance(full_widths, list):
        kept = [i for i in (layers if layers is not None else range(len(full_widths))) if sparse(i)]
        return _int_field(name, key, value, 1, min(full_widths[i] for i in kept) if kept else None)
    return _int_field(name, key, value, 1, full_widths)


def _resolve_heads(name: str, fields: dict, sizes: dict, full: dict, group: int | None) -> None:
    # Prefix views keep whole KV groups: query heads [0, n) share KV heads [0, n / group) only when the variant's
    # group size equals the full model's.
    heads, kv = fields.get("num_attention_heads"), fields.get("num_key_value_heads")
    if group is None:
        if heads is not None and kv is not None and heads % kv:
            raise ValueError(
                f"elastic variant {name!r}: num_key_value_heads={kv} must divide num_attention_heads={heads} "
                "(head divisibility)."
            )
        return
    if heads is None and kv is None:
        return
    if heads is None:
        heads = kv * group
        if heads > full["num_attention_heads"]:
            raise ValueError(
                f"elastic variant {name!r}: num_key_value_heads={kv} is larger than the full model's "
                f"{full['num_key_value_heads']}."
            )
    valid = list(range(group, full["num_attention_heads"] + 1, group))
    if heads % group:
        raise ValueError(
            f"elastic variant {name!r}: num_attention_heads={heads} breaks head divisibility: variants keep whole "
            f"KV groups of {group} query heads, so valid values are {valid}."
        )
    if kv is not None and kv * group != heads:
        raise ValueError(
            f"elastic variant {name!r}: num_key_value_heads={kv} with num_attention_heads={heads} breaks head "
            f"divisibility: variants keep whole KV groups of {group} query heads, so num_key_value_heads must be "
            f"{heads // group}."
        )
    sizes["num_attention_heads"], sizes["num_key_value_heads"] = heads, heads // group


def _check_nested(a: str, sa: dict, b: str, sb: dict) -> None:
    smaller_a, smaller_b = [], []
    for key in ELASTIC_NESTED_FIELDS:
        if key == "num_hidden_layers":
            la, lb = sa["layers"], sb["layers"]
            if la is None or lb is None:
                continue
            if not set(la) <= set(lb):
                smaller_b.append((key, la, lb))
            if not set(lb) <= set(la):
                smaller_a.append((key, la, lb))
            continue
        if key == "moe_intermediate_size":
            for layer, va, vb in _width_pairs(sa, sb):
                label = key if layer is None else f"{key} (layer {layer})"
                if va > vb:
                    smaller_b.append((label, va, vb))
                elif vb > va:
                    smaller_a.append((label, va, vb))
            continue
        va, vb = sa[key], sb[key]
        va = float("inf") if va is None else va
        vb = float("inf") if vb is None else vb
        if va > vb:
            smaller_b.append((key, va, vb))
        elif vb > va:
            smaller_a.append((key, va, vb))
    if smaller_a and smaller_b:
        key_a, va_a, vb_a = smaller_a[0]
        key_b, va_b, vb_b = smaller_b[0]
        raise ValueError(
            f"elastic variants {a!r} and {b!r} do not nest on axis {key_b}: {a!r} is smaller on {key_a} "
            f"({_show(va_a)} vs {_show(vb_a)}) but larger on {key_b} ({_show(va_b)} vs {_show(vb_b)}); every smaller "
            "variant must fit inside every larger one on every axis."
        )


def _show(value: Any) -> str:
    return "full" if value == float("inf") else str(value)


__all__ = [
    "ELASTIC_FIELDS",
    "ELASTIC_NESTED_FIELDS",
    "FULL_VARIANT",
    "SlimMoeElasticSizes",
    "SlimMoeVariantPlan",
    "build_variant_config",
    "build_variant_plan",
    "canonical_expert_widths",
    "resolve_elastic_variants",
    "variant_names",
    "variant_sizes",
]
