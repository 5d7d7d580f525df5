"""`PruneConfig`: one pruning step, validated, JSON-serialisable (several steps: `ProgressivePlan` in
`hf_slim.pruning.progressive`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

# Target sizes, named as the config fields they set in the canonical (Qwen3-MoE) spelling: the anatomy vocabulary's.
from ..anatomy.vocabulary import SIZE_FIELDS

__all__ = ["PruneConfig", "SIZE_FIELDS"]

_CHOICES = {
    "depth_method": ("last", "block_influence"),
    "hidden_method": ("slimqwen", "minitron"),
    "expert_strategy": ("frequency", "soft", "reap", "merge", "partial_preserve"),
    "merge_similarity": ("router_logits", "router_weight", "expert_output"),
    "merge_importance": ("frequency", "soft", "reap"),
}
_NO_FRACTION = ("num_key_value_heads", "num_experts_per_tok")


def _size_help(what: str) -> str:
    return f"Target {what}: an int (absolute), a float in (0, 1] (fraction of the source, rounded), or None (keep)."


@dataclass
class PruneConfig:
    """One structured pruning step (SlimQwen / Minitron style).

    Every size is named as the config field it sets, in the Qwen3-MoE spelling whatever the family (the axes spec
    maps `num_experts` to Mixtral's `num_local_experts`, `moe_intermediate_size` to its `intermediate_size`, ...).
    `None` leaves an axis alone; an int is the target; a float in (0, 1] is a fraction of the source size.

    Example:
        ```python
        >>> PruneConfig(num_hidden_layers=0.75, hidden_size=1536, num_experts=256, num_experts_per_tok=8)
        ```
    """

    num_hidden_layers: int | float | None = field(default=None, metadata={"help": _size_help("decoder layers")})
    depth_method: str = field(
        default="last",
        metadata={"help": "`last` drops the last layers (SlimQwen default); `block_influence` drops the layers with "
                  "the lowest 1 - cos(in, out), keeping the ratio of layer types in hybrid models."},
    )
    hidden_size: int | float | None = field(default=None, metadata={"help": _size_help("hidden size")})
    hidden_method: str = field(
        default="slimqwen",
        metadata={"help": "`slimqwen`: mean over all RMSNorm outputs of mean |x|; `minitron`: mean over sequence, "
                  "L2 over batch."},
    )
    num_attention_heads: int | float | None = field(default=None, metadata={"help": _size_help("query heads")})
    num_key_value_heads: int | None = field(
        default=None,
        metadata={"help": "Target KV heads (whole KV groups are dropped by their summed head importance). None keeps "
                  "every KV head and prunes query heads inside each group."},
    )
    moe_intermediate_size: int | float | None = field(default=None, metadata={"help": _size_help("expert FFN width")})
    shared_expert_intermediate_size: int | float | None = field(
        default=None, metadata={"help": _size_help("shared-expert FFN width")}
    )
    intermediate_size: int | float | None = field(
        default=None, metadata={"help": _size_help("dense-layer FFN width")}
    )
    num_experts: int | float | None = field(default=None, metadata={"help": _size_help("routed experts per layer")})
    num_experts_per_tok: int | None = field(default=None, metadata={"help": "Target top-k (None keeps it)."})
    expert_strategy: str = field(
        default="reap",
        metadata={"help": "`frequency`, `soft`, `reap` (drop the lowest-scored), `merge` (drop, then merge each into "
                  "its most similar kept expert) or `partial_preserve` (SlimQwen Algorithm 1)."},
    )
    merge_similarity: str = field(
        default="router_logits",
        metadata={"help": "Expert similarity for merging: `router_logits`, `router_weight` or `expert_output`."},
    )
    merge_importance: str = field(
        default="frequency",
        metadata={"help": "Importance that picks kept experts and weights merges: `frequency`, `soft` or `reap`."},
    )

    def __post_init__(self) -> None:
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}={value!r}: must be an int, a float in (0, 1] or None")
            if isinstance(value, float):
                if name in _NO_FRACTION:
                    raise ValueError(f"{name}={value!r}: must be an int (no fractions for this field)")
                if not (0.0 < value <= 1.0) or math.isnan(value):
                    raise ValueError(f"{name}={value!r}: a fraction must lie in (0, 1]")
            elif value < 1:
                raise ValueError(f"{name}={value!r}: must be >= 1")
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name}={value!r}: valid values are {list(choices)}")
        if (
            isinstance(self.num_experts, int)
            and self.num_experts_per_tok is not None
            and self.num_experts_per_tok > self.num_experts
        ):
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok}: larger than num_experts={self.num_experts}"
            )
        if (
            isinstance(self.num_attention_heads, int)
            and self.num_key_value_heads is not None
            and self.num_attention_heads % self.num_key_value_heads
        ):
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads}: must be a multiple of num_key_value_heads="
                f"{self.num_key_value_heads}"
            )

    # ---- serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"PruneConfig: unknown field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "PruneConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    # ---- targets -----------------------------------------------------------------------------------------
    @property
    def is_noop(self) -> bool:
        return all(getattr(self, n) is None for n in SIZE_FIELDS)

    def resolve(self, model_config: Any) -> dict[str, int]:
        """Absolute targets for a source config; raises `ValueError` for targets the source cannot give.

        Only the fields that change something are returned.
        """
        from ..anatomy import get_spec

        spec = get_spec(model_config)
        out: dict[str, int] = {}
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            source = getattr(model_config, spec.field(name), None)
            if name == "shared_expert_intermediate_size" and not source:
                raise ValueError(f"{name}={value}: {model_config.model_type} has no shared expert")
            if name == "intermediate_size" and "ffn" not in spec.axes():
                raise ValueError(f"{name}={value}: {model_config.model_type} has no dense FFN layers")
            if name == "moe_intermediate_size" and "expert_ffn" not in spec.axes():
                raise ValueError(f"{name}={value}: {model_config.model_type} has no routed experts")
            if source is None:
                raise ValueError(f"{name}={value}: the source config has no {spec.field(name)!r}")
            target = max(1, round(value * source)) if isinstance(value, float) else int(value)
            if target > source:
                raise ValueError(f"{name}={value}: larger than the source model's {spec.field(name)}={source}")
            out[name] = target
        heads = out.get("num_attention_heads", model_config.num_attention_heads)
        kv = out.get("num_key_value_heads", model_config.num_key_value_heads)
        if heads % kv:
            raise ValueError(
                f"num_attention_heads={heads}: must be a multiple of num_key_value_heads={kv} (set "
                f"num_key_value_heads to a divisor, or pick a multiple of {kv})"
            )
        group = model_config.num_attention_heads // model_config.num_key_value_heads
        if heads // kv > group:
            raise ValueError(
                f"num_attention_heads={heads} over num_key_value_heads={kv} needs {heads // kv} heads per KV group, "
                f"the source has {group}; keep more KV heads"
            )
        experts = out.get("num_experts", getattr(model_config, spec.field("num_experts"), None))
        topk = out.get("num_experts_per_tok", getattr(model_config, spec.field("num_experts_per_tok"), None))
        if experts is not None and topk is not None and topk > experts:
            raise ValueError(f"num_experts_per_tok={topk}: larger than num_experts={experts}")
        return {k: v for k, v in out.items() if v != getattr(model_config, spec.field(k))}
