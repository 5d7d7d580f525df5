"""`PruneConfig` (one pruning step, validated, JSON-serialisable) and `ProgressivePlan` (several steps)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PruneConfig", "ProgressivePlan", "SIZE_FIELDS"]

#: Target sizes, named as the config fields they set in the canonical (Qwen3-MoE) spelling.
SIZE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "intermediate_size",
    "num_experts",
    "num_experts_per_tok",
)
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


# Size fields that only some architectures carry as that axis: Mixtral's `intermediate_size` attribute is its expert
# width, so a dense `intermediate_size` target must not be compared with it.
_AXIS_OF_FIELD = {
    "intermediate_size": "ffn",
    "moe_intermediate_size": "expert_ffn",
    "shared_expert_intermediate_size": "shared_ffn",
}


def _model_sizes(config: Any) -> dict[str, int | None]:
    """The `SIZE_FIELDS` of a model config, read through its anatomy spec (Mixtral's `num_local_experts` is
    `num_experts`, ...); `None` where the architecture has no such size, or not as one positive int (e.g. per-layer
    expert widths), so that `prune` reports those cases in its own words."""
    from ..anatomy import get_spec

    spec = get_spec(config)
    axes = spec.axes()
    sizes: dict[str, int | None] = {}
    for name in SIZE_FIELDS:
        value = getattr(config, spec.field(name), None)
        carried = name not in _AXIS_OF_FIELD or _AXIS_OF_FIELD[name] in axes
        valid = isinstance(value, int) and not isinstance(value, bool) and value > 0
        sizes[name] = value if carried and valid else None
    return sizes


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


@dataclass
class ProgressivePlan:
    """Several pruning stages applied one after the other (recovery training between stages is the distillation
    trainer's job). Sizes in later stages are absolute targets or fractions of the ORIGINAL model.

    Every size a stage sets must be strictly smaller than the model's size when that stage starts (omit a field to
    keep it): [`~ProgressivePlan.resolve_stage`] and [`~ProgressivePlan.check`] refuse anything else with a
    `ValueError` naming the stage and the field, instead of training a model of another size than the plan asks for.

    Example (SlimQwen's depth-first two stages):
        ```python
        >>> plan = ProgressivePlan.depth_first(PruneConfig(num_hidden_layers=36, hidden_size=1536, num_experts=256))
        >>> plan.stages[0].num_hidden_layers, plan.stages[1].hidden_size
        ```
    """

    stages: list[PruneConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: a ProgressivePlan needs at least one PruneConfig")
        self.stages = [s if isinstance(s, PruneConfig) else PruneConfig.from_dict(s) for s in self.stages]

    @classmethod
    def depth_first(
        cls, final: PruneConfig, num_source_layers: int | None = None, first_stage_share: float = 0.5
    ) -> "ProgressivePlan":
        """SlimQwen's progressive recipe: stage 1 makes `first_stage_share` of the depth cut and nothing else;
        stage 2 makes the rest of the depth cut and all width/expert pruning.

        Each stage must cut at least one layer (a stage size must be strictly smaller than the model's size when the
        stage starts), so with an absolute target stage 1 removes between 1 and `cut - 1` layers, and a cut of a
        single layer is refused (use `ProgressivePlan(stages=[final])`). A fractional split that rounds to no cut
        is refused when the plan is resolved ([`~ProgressivePlan.check`]).

        Args:
            final (`PruneConfig`): the end point; `num_hidden_layers` must be set.
            num_source_layers (`int`, optional): needed when `final.num_hidden_layers` is an absolute count.
            first_stage_share (`float`, defaults to 0.5): share of the removed layers removed in stage 1.
        """
        depth = final.num_hidden_layers
        if depth is None:
            raise ValueError("num_hidden_layers: depth_first needs a depth target in the final PruneConfig")
        if not 0.0 < first_stage_share < 1.0:
            raise ValueError(f"first_stage_share={first_stage_share}: must lie in (0, 1)")
        if isinstance(depth, float):
            if depth >= 1.0:
                raise ValueError(f"num_hidden_layers={depth}: no depth cut to split into two stages")
            first_depth: int | float = 1.0 - (1.0 - depth) * first_stage_share
        else:
            if num_source_layers is None:
                raise ValueError(
                    "num_source_layers: needed to split an absolute num_hidden_layers target into two stages"
                )
            if depth >= num_source_layers:
                raise ValueError(
                    f"num_hidden_layers={depth}: not smaller than num_source_layers={num_source_layers}, no depth cut "
                    "to split into two stages"
                )
            cut = num_source_layers - depth
            if cut < 2:
                raise ValueError(
                    f"num_hidden_layers={depth}: a cut of one layer from num_source_layers={num_source_layers} cannot "
                    "be split into two stages; use ProgressivePlan(stages=[final])"
                )
            first_depth = num_source_layers - min(cut - 1, max(1, round(cut * first_stage_share)))
        first = PruneConfig(num_hidden_layers=first_depth, depth_method=final.depth_method)
        return cls(stages=[first, final])

    def resolve_stage(
        self, index: int, original_config: Any, current_config: Any, *, label: str = "stages"
    ) -> PruneConfig:
        """Stage `index` as absolute sizes for the model it starts from.

        Fractions are taken of the ORIGINAL model; every size the stage sets must be strictly smaller than the
        current model's (a size the current model already has, or exceeds, is refused, not dropped). Sizes are read
        through each config's own anatomy spec, so the original and the current model may be different families
        (e.g. a Mixtral teacher and its SlimMoe student); a size the current architecture lacks is passed on for
        `prune` to report.

        Args:
            index (`int`): Which stage (0-based).
            original_config: Config of the original model; fractions are taken of it.
            current_config: Config of the model the stage prunes.
            label (`str`, *optional*, defaults to `"stages"`): How messages name the stage list (e.g.
                `"prune_stages"` for a distillation config).

        Returns:
            [`PruneConfig`] with absolute sizes (`None` where the stage keeps the size).

        Raises:
            `ValueError`: a size not strictly smaller than the current model's, or a fraction of a size the original
                model does not hold as one positive int; the message names the stage and the field.
        """
        original, current = _model_sizes(original_config), _model_sizes(current_config)
        return self._resolve(index, original_config, original, current, label)

    def check(self, original_config: Any, start_config: Any = None, *, label: str = "stages") -> list[PruneConfig]:
        """Resolve every stage against the sizes the model will have when that stage starts, from configs only, so
        that an impossible stage fails before any weights or data are loaded, or any stage is calibrated or trained.

        Args:
            original_config: Config of the original model; fractions are taken of it.
            start_config (*optional*): Config of the model stage 1 starts from (e.g. a separate student); defaults
                to `original_config`.
            label (`str`, *optional*, defaults to `"stages"`): How messages name the stage list.

        Returns:
            `list[PruneConfig]`: one resolved config per stage (see [`~ProgressivePlan.resolve_stage`]).

        Raises:
            `ValueError`: as [`~ProgressivePlan.resolve_stage`], for the first stage that cannot be resolved.
        """
        original = _model_sizes(original_config)
        current = _model_sizes(start_config if start_config is not None else original_config)
        stages = []
        for index in range(len(self.stages)):
            stage = self._resolve(index, original_config, original, current, label)
            stages.append(stage)
            current.update({k: v for k, v in stage.to_dict().items() if k in SIZE_FIELDS and v is not None})
        return stages

    def _resolve(
        self,
        index: int,
        original_config: Any,
        original: dict[str, int | None],
        current: dict[str, int | None],
        label: str,
    ) -> PruneConfig:
        data = self.stages[index].to_dict()
        where = f"{label}[{index}] (stage {index + 1})"
        for name in SIZE_FIELDS:
            value = data[name]
            if value is None:
                continue
            source = original[name]
            if isinstance(value, float):
                if source is None:
                    raise ValueError(
                        f"{where}: {name}={value!r} is a fraction of the original model's {name}, which the original "
                        f"{original_config.model_type} config does not hold as one positive int; give an absolute "
                        "size or omit the field."
                    )
                target = max(1, round(value * source))
            else:
                target = int(value)
            have = current[name]
            # dropping such a target ("keep") would silently give a model of another size than the plan asks for
            if have is not None and target >= have:
                given = f"{name}={value!r}"
                if isinstance(value, float):
                    given += f" (= {target} of the original model's {source})"
                raise ValueError(
                    f"{where}: {given} is not smaller than the current model's {name}={have}; a stage size must be "
                    "strictly smaller than the size the model has when the stage starts (omit the field to keep it)."
                )
            data[name] = target
        return PruneConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages]}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProgressivePlan":
        if set(data) != {"stages"}:
            raise ValueError(f"ProgressivePlan: expected only the field 'stages', got {sorted(data)}")
        return cls(stages=list(data["stages"]))

    def run(self, model: Any, calibrate: Any, recover: Any = None) -> Any:
        """Prune stage by stage. `calibrate(model) -> ImportanceStats` runs before each stage (statistics of the
        current model); `recover(model, stage_index) -> model`, if given, runs after every stage but the last.

        Every stage is first checked from the configs ([`~ProgressivePlan.check`]), so an impossible stage raises
        `ValueError` before anything is calibrated; each stage is then resolved against the model it starts from.
        """
        from .prune import prune

        original = model.config
        self.check(original)
        for i in range(len(self.stages)):
            stage = self.resolve_stage(i, original, model.config)
            stats = calibrate(model) if not stage.is_noop else None
            model = prune(model, stage, stats)
            if recover is not None and i < len(self.stages) - 1:
                model = recover(model, i)
        return model
