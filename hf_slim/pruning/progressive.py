"""`ProgressivePlan` (several pruning stages, validated against the sizes each stage starts from) and
`prune_progressively`, the one loop that runs them (calibrate -> prune -> recover, stage by stage)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import SIZE_FIELDS, PruneConfig
from .prune import prune
from .stats import ImportanceStats

__all__ = ["ProgressivePlan", "prune_progressively"]


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
        The loop is [`prune_progressively`].
        """
        after_stage = None if recover is None else (lambda model, index, stage: recover(model, index))
        return prune_progressively(model, self, calibrate, after_stage)


def prune_progressively(
    model: Any,
    plan: ProgressivePlan,
    calibrate: Callable[[Any], ImportanceStats],
    after_stage: Callable[[Any, int, PruneConfig], Any] | None = None,
    *,
    original_config: Any = None,
    after_last_stage: bool = False,
    label: str = "stages",
) -> Any:
    """Prune `model` stage by stage along `plan`, calibrating before each stage and handing each pruned model to
    `after_stage` (recovery training). The one loop behind [`ProgressivePlan.run`] and `hf-slim distill`.

    Every stage is first checked from the configs ([`~ProgressivePlan.check`]), so an impossible stage raises
    `ValueError` before anything is calibrated; each stage is then resolved against the model it starts from
    ([`~ProgressivePlan.resolve_stage`]). A stage that sets no size is not calibrated and leaves the model as it is.

    Args:
        model ([`~transformers.PreTrainedModel`]): The model stage 1 starts from.
        plan ([`ProgressivePlan`]): The stages.
        calibrate (`Callable`): `calibrate(model) -> ImportanceStats`, the statistics of the current model.
        after_stage (`Callable`, *optional*): `after_stage(model, stage_index, stage) -> model`, with `stage` the
            resolved [`PruneConfig`] of the stage (absolute sizes); runs after every stage but the last.
        original_config (*optional*): Config of the original model, whose sizes fractions are taken of; defaults to
            `model.config` (e.g. a teacher's config when `model` is a separate student).
        after_last_stage (`bool`, *optional*, defaults to `False`): Run `after_stage` after the last stage too.
        label (`str`, *optional*, defaults to `"stages"`): How messages name the stage list.

    Returns:
        The model after the last stage (and its `after_stage`).
    """
    original = model.config if original_config is None else original_config
    plan.check(original, model.config, label=label)
    last = len(plan.stages) - 1
    for index in range(len(plan.stages)):
        stage = plan.resolve_stage(index, original, model.config, label=label)
        if not stage.is_noop:
            model = prune(model, stage, calibrate(model))
        if after_stage is not None and (index < last or after_last_stage):
            model = after_stage(model, index, stage)
    return model
