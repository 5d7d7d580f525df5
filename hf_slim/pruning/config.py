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
from .budget import BUDGET_AXES, parse_param_count, resolve_budget
from .scores import HIDDEN_METHODS

__all__ = ["PruneConfig", "SIZE_FIELDS"]

_CHOICES = {
    "depth_method": ("last", "block_influence"),
    "hidden_method": HIDDEN_METHODS,
    "expert_strategy": ("frequency", "soft", "reap", "merge", "partial_preserve"),
    "merge_similarity": ("router_logits", "router_weight", "expert_output"),
    "merge_importance": ("frequency", "soft", "reap"),
}
_NO_FRACTION = ("num_key_value_heads", "num_experts_per_tok")


_BUDGET_FIELDS = ("target_total_params", "target_active_params")


def _budget_help(what: str) -> str:
    return (
        f"Budget of {what} parameters: an int, a string like '20B' / '3.5B' / '800M', or a fraction in (0, 1] of the "
        "source's; the sizes not set here are chosen to fit it (see hf_slim.pruning.resolve_budget)."
    )


def _size_help(what: str) -> str:
    return f"Target {what}: an int (absolute), a float in (0, 1] (fraction of the source, rounded), or None (keep)."


@dataclass
class PruneConfig:
    """One structured pruning step (SlimQwen / Minitron style).

    Every size is named as the config field it sets, in the Qwen3-MoE spelling whatever the family (the axes spec
    maps `num_experts` to Mixtral's `num_local_experts`, `moe_intermediate_size` to its `intermediate_size`, ...).
    `None` leaves an axis alone; an int is the target; a float in (0, 1] is a fraction of the source size.

    A budget (`target_total_params`, `target_active_params`: `"20B"`, `"3B"`, an int, or a fraction of the source's
    count) chooses the sizes along `budget_axes` (default: depth, hidden, expert width, shared / dense width and, for a
    total budget, expert count; minus every size set explicitly) by the rule of [`resolve_budget`]; `resolve` returns
    the chosen sizes, so `prune` and `pruning_config.json` record them.

    Example:
        ```python
        >>> PruneConfig(num_hidden_layers=0.75, hidden_size=1536, num_experts=256, num_experts_per_tok=8)
        >>> PruneConfig(target_total_params="20B", num_experts_per_tok=8).resolve(model.config)
        {'num_hidden_layers': 46, 'hidden_size': 1856, 'moe_intermediate_size': 640, 'num_experts': 112}
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
        metadata={"help": "`slimqwen` (default): mean over all RMSNorm outputs of mean |x| (SlimQwen); `minitron`: "
                  "signed mean over sequence, L2 over batch (Minitron paper); `minitron_modelopt`: mean |x| over "
                  "sequence, L2 over batch, summed over the decoder norms (NVIDIA ModelOpt)."},
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
    keep_mtp_decodable: bool = field(
        default=True,
        metadata={"help": "GLM-4-MoE / DeepSeek-V3: refuse a depth cut after which stock transformers no longer finds "
                  "the MTP layers (it looks for them at fixed layer numbers), so generate(use_mtp=True) keeps working; "
                  "off: the MTP layers are renumbered after the kept layers anyway."},
    )
    target_total_params: int | float | str | None = field(default=None, metadata={"help": _budget_help("total")})
    target_active_params: int | float | str | None = field(
        default=None, metadata={"help": _budget_help("active (per-token)")}
    )
    budget_axes: list[str] | str | None = field(
        default=None,
        metadata={"help": "Sizes a budget may choose (a list, or names separated by commas), in top-up order. None: "
                  "num_hidden_layers, hidden_size, the expert / shared / dense widths the model has and, for a total "
                  "budget, num_experts; minus the sizes set explicitly."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.keep_mtp_decodable, bool):
            raise ValueError(f"keep_mtp_decodable={self.keep_mtp_decodable!r}: must be true or false")
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
        self._check_budget()
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

    def _check_budget(self) -> None:
        for name in _BUDGET_FIELDS:
            value = getattr(self, name)
            if value is not None:
                parse_param_count(value, name=name)
        axes = self.budget_axes
        if axes is None:
            return
        if isinstance(axes, str):
            axes = [a.strip() for a in axes.split(",") if a.strip()]
        if not isinstance(axes, (list, tuple)) or not axes or not all(isinstance(a, str) for a in axes):
            raise ValueError(
                f"budget_axes={self.budget_axes!r}: give a non-empty list of size names (or one string of names "
                f"separated by commas) from {list(BUDGET_AXES)}"
            )
        self.budget_axes = list(axes)
        if not self.has_budget:
            raise ValueError(
                f"budget_axes={self.budget_axes}: set target_total_params or target_active_params for the budget to "
                "choose these sizes"
            )
        for a in self.budget_axes:
            if a not in BUDGET_AXES:
                raise ValueError(f"budget_axes: {a!r} is not a size field; valid axes: {list(BUDGET_AXES)}")
            if getattr(self, a) is not None:
                raise ValueError(
                    f"budget_axes: {a} is also set to {getattr(self, a)!r}; remove it from budget_axes or unset it"
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
    def has_budget(self) -> bool:
        """Whether a parameter budget chooses some of the sizes."""
        return any(getattr(self, n) is not None for n in _BUDGET_FIELDS)

    @property
    def is_noop(self) -> bool:
        return not self.has_budget and all(getattr(self, n) is None for n in SIZE_FIELDS)

    def resolve(self, model_config: Any, stats: Any = None) -> dict[str, int]:
        """Absolute targets for a source config; raises `ValueError` for targets the source cannot give.

        With a budget, the sizes it chooses ([`resolve_budget`], the explicit sizes fixed) are among the targets.
        Only the fields that change something are returned.

        Args:
            model_config: the source model's config.
            stats ([`ImportanceStats`], *optional*): with `depth_method="block_influence"`, lets a budget count the
                layers block influence keeps (it matters only where layers differ, e.g. dense and sparse layers).
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
            if name == "hidden_size" and target < 2:
                raise ValueError(
                    f"{name}={value}: a residual stream of {target} channel is degenerate (RMSNorm of one channel keeps "
                    f"only its sign); valid sizes are 2..{source}"
                )
            out[name] = target
        if self.has_budget:
            out.update(
                resolve_budget(
                    model_config,
                    target_total_params=self.target_total_params,
                    target_active_params=self.target_active_params,
                    axes=self.budget_axes,
                    fixed=out,
                    stats=stats,
                    depth_method=self.depth_method,
                )
            )
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
        _warn_unaligned(out)
        return {k: v for k, v in out.items() if v != getattr(model_config, spec.field(k))}


#: Widths transformers' default experts kernel (`grouped_mm`) multiplies along: their rows must be 16-byte aligned.
_ALIGNED_WIDTHS = ("hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size")


def _warn_unaligned(targets: dict[str, int]) -> None:
    """Warn about a target width that is not a multiple of 8: transformers' default experts kernel (`grouped_mm`,
    5.x) needs 16-byte aligned rows (8 bf16 / 4 fp32 values), and a stock MoE of such a width fails at its first
    forward ("strides should be multiple of 16 bytes") unless it runs the eager experts."""
    odd = {name: targets[name] for name in _ALIGNED_WIDTHS if name in targets and targets[name] % 8}
    if odd:
        import logging

        logging.getLogger(__name__).warning(
            "%s: not a multiple of 8. transformers' default experts kernel (grouped_mm) needs 16-byte aligned rows, "
            "so the pruned model runs only with from_pretrained(..., experts_implementation='eager'); pick multiples "
            "of 8 to keep the fast kernel.", ", ".join(f"{k}={v}" for k, v in odd.items()),
        )  # fmt: skip
