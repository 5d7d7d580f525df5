"""`ElasticConfig`: named nested variants of one SlimMoe model, stored in `config.json` under `elastic`."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from ..models.slim_moe.configuration_slim_moe import (
    ELASTIC_FIELDS,
    FULL_VARIANT,
    SlimMoeConfig,
    resolve_elastic_variants,
)

__all__ = ["ElasticConfig", "ELASTIC_FIELDS", "FULL_VARIANT"]


@dataclass
class ElasticConfig:
    """Named variants nested inside one model; the model itself is the implicit largest, `"full"`.

    Each variant maps config fields to its size along that axis: `num_hidden_layers` (a count, meaning the first
    layers, or a sorted list of kept layer indices), `hidden_size`, `num_attention_heads` / `num_key_value_heads`
    (whole KV groups: the query heads per KV head stay the full model's), `num_experts`, `num_experts_per_tok`,
    `moe_intermediate_size` (an int, or a list of one int per kept layer as Gemma 3n's `intermediate_size`),
    `shared_expert_intermediate_size` (0 drops the shared expert) and `intermediate_size`
    (dense layers). Fields left out keep the full model's size. Every variant is a prefix of the full model along
    every axis, so every smaller variant must fit inside every larger one.

    Validation runs on construction (sizes, head divisibility, nesting between the variants) and again against a
    model with [`ElasticConfig.validate`]; errors name the variant and the field. `SlimMoeConfig(elastic=...)` takes
    an `ElasticConfig` as well as its dict and stores it as `to_dict()`.

    Args:
        variants (`dict[str, dict[str, int | list[int]]]`): variant name -> `{config field: size}`.

    Example:
        ```python
        >>> elastic = ElasticConfig(variants={"small": {"hidden_size": 512, "num_experts": 32}, "medium": {"num_experts": 64}})
        >>> elastic.validate(model.config)["small"]["num_experts"]
        32
        ```
    """

    variants: dict[str, dict[str, Any]] = field(
        metadata={"help": "Variant name -> {config field: size}; fields: " + ", ".join(ELASTIC_FIELDS)}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.variants, dict) or not self.variants:
            raise ValueError(
                f"ElasticConfig.variants must be a non-empty dict of variant name -> {{field: size}}, got {self.variants!r}."
            )
        self.variants = copy.deepcopy(self.variants)
        for fields in self.variants.values():
            for key in ("num_hidden_layers", "moe_intermediate_size"):
                if isinstance(fields, dict) and isinstance(fields.get(key), tuple):
                    fields[key] = list(fields[key])
        resolve_elastic_variants(self.to_dict())

    @property
    def names(self) -> list[str]:
        """Variant names, smallest first (without `"full"`)."""
        return list(resolve_elastic_variants(self.to_dict()))

    def validate(self, config: SlimMoeConfig) -> dict[str, dict[str, Any]]:
        """Check the variants against the full model's config and resolve them to explicit sizes.

        Returns:
            `{name: sizes}` smallest first, as in `SlimMoeConfig.elastic_variant_sizes`.

        Raises:
            `ValueError`: naming the variant and the field (size above the full model's, broken KV groups, ...).
        """
        return resolve_elastic_variants(self.to_dict(), config)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored as `config.elastic`."""
        return {"variants": copy.deepcopy(self.variants)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ElasticConfig":
        """From `{"variants": {...}}` (the stored form) or directly from the variants mapping."""
        if not isinstance(data, dict):
            raise ValueError(f"ElasticConfig.from_dict needs a dict, got {type(data).__name__}.")
        variants = data["variants"] if isinstance(data.get("variants"), dict) else data
        return cls(variants=variants)

    @classmethod
    def from_model_config(cls, config: SlimMoeConfig) -> "ElasticConfig":
        """The variants a model's config carries.

        Raises:
            `ValueError`: the config has no `elastic` variants.
        """
        if not getattr(config, "elastic", None):
            raise ValueError(
                f"{type(config).__name__} has no elastic variants (config.elastic is None); build them with "
                "hf_slim.elastic.make_elastic."
            )
        return cls.from_dict(config.elastic)
