# Copyright 2026 The hf-slim developers. Licensed under the Apache License, Version 2.0.
"""SlimMoe model configuration.

This file is copied next to the weights by `hf_slim.hub.save_for_hub`, so it imports nothing from hf_slim.
"""

import copy
from typing import Any, Protocol, runtime_checkable

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


QK_NORM_TYPES = ("head", "full")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
MLP_LAYER_TYPES = ("sparse", "dense")
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


@runtime_checkable
class SupportsToDict(Protocol):
    """Any object with a `to_dict()`, such as `hf_slim.elastic.ElasticConfig`."""

    def to_dict(self) -> dict: ...


@strict
class SlimMoeConfig(PreTrainedConfig):
    r"""
    Configuration of a SlimMoe model: Qwen3-MoE-style decoder blocks (GQA attention with q/k RMSNorm and RoPE, softmax
    top-k routed experts stored as fused 3D tensors, optional sigmoid-gated shared expert, optional dense layers) plus
    optional multi-token-prediction (MTP) heads in the DeepSeek-V3 / Qwen3-Next layout.

    The fields that stock MoE families spell differently are spelled here as in Qwen3-MoE, so that converters and the
    pruning/elastic axes specs can name them the same way for every family.

    Args:
        vocab_size (`int`): Vocabulary size.
        hidden_size (`int`): Width of the residual stream.
        intermediate_size (`int`): Width of the FFN of dense layers (see `mlp_layer_types`).
        num_hidden_layers (`int`): Number of decoder blocks.
        num_attention_heads (`int`): Number of query heads.
        num_key_value_heads (`int`): Number of key/value heads (GQA); must divide `num_attention_heads`.
        head_dim (`int`, *optional*): Per-head width; defaults to `hidden_size // num_attention_heads`.
        hidden_act (`str`): Activation of the gated FFNs.
        max_position_embeddings (`int`): Longest sequence the RoPE tables are built for.
        initializer_range (`float`): Std of the normal init.
        rms_norm_eps (`float`): RMSNorm epsilon.
        use_cache (`bool`): Whether generation uses a KV cache.
        tie_word_embeddings (`bool`): Share the input embedding and the LM head.
        rope_parameters (`dict`, *optional*): RoPE settings as in transformers (`rope_type`, `rope_theta`, ...).
        attention_bias (`bool`): Bias on the q/k/v projections.
        attention_output_bias (`bool`): Bias on the output projection.
        qk_norm (`str`, *optional*): `"head"` (per-head RMSNorm, Qwen3), `"full"` (RMSNorm over the whole projected
            width, OLMoE) or `None`.
        clip_qkv (`float`, *optional*): Clamp q/k/v to [-clip_qkv, clip_qkv] (OLMoE).
        sliding_window (`int`, *optional*): Window of the `"sliding_attention"` layers.
        layer_types (`list[str]`, *optional*): Per layer `"full_attention"` or `"sliding_attention"`.
        attention_dropout (`float`): Dropout on attention probabilities.
        num_experts (`int`): Routed experts per sparse layer.
        num_experts_per_tok (`int`): Experts each token is routed to (top-k).
        moe_intermediate_size (`int` or `list[int]`): FFN width of one routed expert: one int for every layer, or one
            per decoder layer (as Gemma 3n's `intermediate_size`; entries of dense layers are unused). MTP blocks use
            the widest sparse layer's width (see `expert_intermediate_size`).
        norm_topk_prob (`bool`): Renormalise the top-k routing weights to sum to one.
        shared_expert_intermediate_size (`int`): FFN width of the sigmoid-gated shared expert; 0 means none.
        mlp_layer_types (`list[str]`, *optional*): Per layer `"sparse"` (MoE) or `"dense"`; defaults to all sparse.
        router_aux_loss_coef (`float`): Weight of the load-balancing loss added to the loss when router logits are
            returned.
        output_router_logits (`bool`): Return router logits (and the aux loss) by default.
        num_mtp_heads (`int`): Number D >= 0 of multi-token-prediction depths.
        mtp_loss_weight (`float`): Weight of the mean MTP loss in `loss` when labels are given.
        elastic (`dict` or `ElasticConfig`, *optional*): Nested elastic variants `{"variants": {name: {field: size}}}`
            (or an `hf_slim.elastic.ElasticConfig`, stored as its `to_dict()`); stored as plain JSON and validated on
            load. Every variant is a prefix of the full model along every axis; `variant_config(name)` gives a plain
            config of that size.
    """

    model_type = "slim_moe"
    # Outputs Trainer.prediction_step leaves out of the predictions it gathers, so `predict` / `compute_metrics` see the
    # logits as with a stock model: the KV cache (`cache` since transformers 5.24) and the per-term / MTP outputs.
    keys_to_ignore_at_inference = ["cache", "lm_loss", "mtp_losses", "mtp_hidden_states", "mtp_logits"]
    default_theta = 1000000.0

    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_output_bias: bool = False
    qk_norm: str | None = "head"
    clip_qkv: float | int | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    attention_dropout: float | int = 0.0
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int | list[int] = 768
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    mlp_layer_types: list[str] | None = None
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    num_mtp_heads: int = 0
    mtp_loss_weight: float = 0.3
    elastic: dict | SupportsToDict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __setattr__(self, key, value):
        # `config.elastic` is always stored as its plain dict (JSON in config.json), as transformers does with
        # `quantization_config` objects. This file ships next to the weights as remote code and imports nothing
        # from hf_slim, so an `ElasticConfig` is recognised by duck typing: any object with a `to_dict()`.
        if key == "elastic" and value is not None and not isinstance(value, dict) and isinstance(value, SupportsToDict):
            value = value.to_dict()
        super().__setattr__(key, value)

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse"] * self.num_hidden_layers
        if self.layer_types is None:
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        self._check_fields()
        super().__post_init__(**kwargs)

    def _check_fields(self) -> None:
        # Raised as plain ValueError (not a strict-dataclass validator) so users see the field name directly.
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_experts",
            "num_experts_per_tok",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SlimMoeConfig.{name} must be a positive integer, got {value!r}.")
        widths = self.moe_intermediate_size
        if isinstance(widths, list):
            if len(widths) != self.num_hidden_layers:
                raise ValueError(
                    f"SlimMoeConfig.moe_intermediate_size has {len(widths)} entries but num_hidden_layers is "
                    f"{self.num_hidden_layers}; give one positive integer, or one per layer."
                )
            bad = [w for w in widths if isinstance(w, bool) or not isinstance(w, int) or w <= 0]
            if bad:
                raise ValueError(
                    f"SlimMoeConfig.moe_intermediate_size entries must be positive integers, got {bad} in {widths}."
                )
        elif isinstance(widths, bool) or not isinstance(widths, int) or widths <= 0:
            raise ValueError(
                f"SlimMoeConfig.moe_intermediate_size must be a positive integer or a list of one per layer, got "
                f"{widths!r}."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"SlimMoeConfig.num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads}); valid values are the divisors of {self.num_attention_heads}."
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"SlimMoeConfig.num_experts_per_tok ({self.num_experts_per_tok}) is larger than num_experts "
                f"({self.num_experts}); it must be between 1 and num_experts."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"SlimMoeConfig.head_dim must be even for RoPE, got {self.head_dim}.")
        for name in ("shared_expert_intermediate_size", "num_mtp_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"SlimMoeConfig.{name} must be an integer >= 0, got {value!r}.")
        if self.qk_norm is not None and self.qk_norm not in QK_NORM_TYPES:
            raise ValueError(f"SlimMoeConfig.qk_norm must be one of {QK_NORM_TYPES} or None, got {self.qk_norm!r}.")
        for name, allowed in (("mlp_layer_types", MLP_LAYER_TYPES), ("layer_types", ATTENTION_LAYER_TYPES)):
            values = getattr(self, name)
            if len(values) != self.num_hidden_layers:
                raise ValueError(
                    f"SlimMoeConfig.{name} has {len(values)} entries but num_hidden_layers is "
                    f"{self.num_hidden_layers}; give one entry per layer."
                )
            bad = sorted({v for v in values if v not in allowed})
            if bad:
                raise ValueError(f"SlimMoeConfig.{name} has invalid entries {bad}; valid entries are {allowed}.")
        if "dense" in self.mlp_layer_types and (not isinstance(self.intermediate_size, int) or self.intermediate_size <= 0):
            raise ValueError(
                f"SlimMoeConfig.intermediate_size must be a positive integer when mlp_layer_types has dense layers, "
                f"got {self.intermediate_size!r}."
            )
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("SlimMoeConfig.sliding_window must be set when layer_types has 'sliding_attention'.")
        if self.mtp_loss_weight < 0:
            raise ValueError(f"SlimMoeConfig.mtp_loss_weight must be >= 0, got {self.mtp_loss_weight}.")
        if self.elastic is not None:
            resolve_elastic_variants(self.elastic, self)

    def expert_intermediate_size(self, layer_idx: int) -> int:
        """FFN width of the routed experts of block `layer_idx`; MTP block `k` is `num_hidden_layers + k` and uses
        the widest sparse decoder layer's width when `moe_intermediate_size` is a per-layer list."""
        widths = self.moe_intermediate_size
        if not isinstance(widths, list):
            return widths
        if layer_idx < self.num_hidden_layers:
            return widths[layer_idx]
        return _mtp_width(widths, self.mlp_layer_types)

    # ---- elastic variants --------------------------------------------------------------------------------------
    def elastic_variant_names(self) -> list[str]:
        """Names of the nested variants, smallest first, ending with the implicit `"full"`."""
        resolved = resolve_elastic_variants(self.elastic, self) if self.elastic else {}
        return [*resolved, FULL_VARIANT]

    def elastic_variant_sizes(self, name: str) -> dict[str, Any]:
        """Every elastic field of variant `name` resolved against this config.

        Returns:
            `dict` with `layers` (the kept decoder layers, as indices of this model) and one int per entry of
            `ELASTIC_FIELDS` (`num_hidden_layers` being `len(layers)`; `moe_intermediate_size` may be a list of one
            width per kept layer, in the form of `canonical_expert_widths`).

        Raises:
            `ValueError`: the config has no `elastic` variants (and `name` is not `"full"`).
            `KeyError`: unknown `name`, listing the variants.
        """
        if name == FULL_VARIANT:
            return _full_sizes(self)
        if not self.elastic:
            raise ValueError(
                f"elastic_variant={name!r}: this SlimMoeConfig has no elastic variants (config.elastic is None); "
                "build them with hf_slim.elastic.make_elastic, or use elastic_variant='full'."
            )
        resolved = resolve_elastic_variants(self.elastic, self)
        if name not in resolved:
            raise KeyError(f"elastic_variant={name!r} is not a variant of this model; variants: {[*resolved, FULL_VARIANT]}")
        return resolved[name]

    def variant_config(self, name: str) -> "SlimMoeConfig":
        """A plain `SlimMoeConfig` of the size of variant `name`.

        The result still carries, under `elastic`, the variants that fit inside `name` (re-expressed against its
        own layer numbering), so a model sliced to `name` is itself elastic over what it contains.
        """
        sizes = self.elastic_variant_sizes(name)
        data = self.to_dict()
        layers = sizes["layers"]
        for key in ELASTIC_FIELDS:
            data[key] = sizes[key]
        data["head_dim"] = self.head_dim
        data["layer_types"] = [self.layer_types[i] for i in layers]
        data["mlp_layer_types"] = [self.mlp_layer_types[i] for i in layers]
        nested = {}
        if self.elastic and name != FULL_VARIANT:
            for other, other_sizes in resolve_elastic_variants(self.elastic, self).items():
                if other != name and _fits(other_sizes, sizes) and not _same(other_sizes, sizes):
                    nested[other] = _relative(other_sizes, sizes)
        elif self.elastic:
            nested = copy.deepcopy(self.elastic.get("variants", {}))
        extra = {k: copy.deepcopy(v) for k, v in (self.elastic or {}).items() if k != "variants"}
        data["elastic"] = {**extra, "variants": nested} if nested else None
        for key in ("model_type", "transformers_version"):
            data.pop(key, None)
        return type(self)(**data)


def _mtp_width(widths: list[int], mlp_layer_types: list[str] | None) -> int:
    sparse = [w for w, kind in zip(widths, mlp_layer_types or ["sparse"] * len(widths)) if kind == "sparse"]
    return max(sparse or widths)


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


__all__ = ["SlimMoeConfig"]
