"""Config translation rules shared by the family specs: how a stock family's config is written as SlimMoe config
fields and back (used by `hf_slim.convert`; each spec's `to_slim_moe` / `from_slim_moe`).

All supported families store their weights under the same names, so conversion is a config translation plus a strict
state-dict copy; what each family does differently is a SlimMoe config field.
"""

from __future__ import annotations

import copy
from typing import Any

from ._rules import qwen_dense_layers

__all__ = [
    "COMMON_FIELDS",
    "common_in",
    "common_out",
    "carried_in",
    "carried_out",
    "qwen_in",
    "qwen_out",
    "require",
    "uniform_window",
    "all_sparse",
    "slim_dense_layers",
]

COMMON_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_dropout",
    "num_experts_per_tok",
    "router_aux_loss_coef",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def _common(config: Any, head_dim: int) -> dict:
    # a field a family lacks (GLM-4-MoE has no router_aux_loss_coef) keeps SlimMoe's default
    fields = {name: getattr(config, name) for name in COMMON_FIELDS if hasattr(config, name)}
    fields["rope_parameters"] = copy.deepcopy(dict(config.rope_parameters))
    fields["head_dim"] = head_dim
    return fields


def common_in(config: Any) -> dict:
    """The SlimMoe fields every stock family holds under the same name."""
    return _common(config, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def common_out(config: Any) -> dict:
    """The stock fields every family holds under the same name, from a `SlimMoeConfig`."""
    return _common(config, config.head_dim)


def carried_in(config: Any, fields: tuple[str, ...], renames: dict[str, str] | None = None) -> dict:
    """SlimMoe field -> value, for SlimMoe `fields` a family holds one to one, some under another name (`renames`:
    SlimMoe name -> the family's, the spec's `config_fields`)."""
    renames = renames or {}
    return {name: getattr(config, renames.get(name, name)) for name in fields}


def carried_out(config: Any, fields: tuple[str, ...], renames: dict[str, str] | None = None) -> dict:
    """The inverse of [`carried_in`]: the family's field -> value, read from a `SlimMoeConfig`."""
    renames = renames or {}
    return {renames.get(name, name): getattr(config, name) for name in fields}


#: What Qwen2-MoE and Qwen3-MoE hold under SlimMoe's own names, besides the common fields.
_QWEN_FIELDS = ("num_experts", "moe_intermediate_size", "intermediate_size", "norm_topk_prob")


def qwen_in(config: Any) -> dict:
    """Qwen2-MoE / Qwen3-MoE -> SlimMoe: experts, widths and the sparse-layer pattern."""
    dense = set(qwen_dense_layers(config))
    layer_types = ["dense" if i in dense else "sparse" for i in range(config.num_hidden_layers)]
    return {**common_in(config), **carried_in(config, _QWEN_FIELDS), "mlp_layer_types": layer_types}


def qwen_out(config: Any) -> dict:
    """SlimMoe -> Qwen2-MoE / Qwen3-MoE: experts, widths, and the dense layers spelled out as `mlp_only_layers`."""
    return {**common_out(config), **carried_out(config, _QWEN_FIELDS), "mlp_only_layers": slim_dense_layers(config)}


def require(config: Any, model_type: str, field: str, allowed: Any, why: str) -> None:
    value = getattr(config, field)
    if value not in allowed:
        raise ValueError(
            f"Cannot convert SlimMoe to {model_type!r}: config.{field}={value!r} but {model_type} supports only "
            f"{allowed} ({why})."
        )


def uniform_window(config: Any, model_type: str) -> int | None:
    kinds = set(config.layer_types)
    if len(kinds) > 1:
        raise ValueError(
            f"Cannot convert SlimMoe to {model_type!r}: config.layer_types mixes {sorted(kinds)} but {model_type} "
            "applies one attention type to every layer."
        )
    return config.sliding_window if kinds == {"sliding_attention"} else None


def slim_dense_layers(config: Any) -> list[int]:
    return [i for i, kind in enumerate(config.mlp_layer_types) if kind == "dense"]


def all_sparse(config: Any, model_type: str) -> None:
    if slim_dense_layers(config):
        raise ValueError(
            f"Cannot convert SlimMoe to {model_type!r}: config.mlp_layer_types has dense layers "
            f"{slim_dense_layers(config)} but every {model_type} layer is sparse."
        )
    require(config, model_type, "shared_expert_intermediate_size", (0,), f"{model_type} has no shared expert")
