"""`hf-slim distill --config CONFIG.yaml [--field value ...]`: SlimQwen's progressive recipe, prune stage 1 -> distill
N1 tokens -> prune stage 2 -> distill N2 tokens (-> ...), with the LR and λ/β schedules continuing across stages, each
stage's model written, and a Hub-ready final folder with a model card (teacher, recipe, token budget, loss curve).

The YAML holds [`DistillScriptArguments`] and [`SlimDistillationConfig`] fields side by side, read by `trl.TrlParser`
([`load_distill_config`]: command-line `--field value` overrides the YAML). [`plan_distill`] checks the whole run from
configs (stages, token budgets, MTP heads against β) before any weights or data are loaded:

```yaml
teacher_model_name_or_path: ./teacher
dataset_name: hf_slim:stdlib          # or a Hub dataset / local json, jsonl, csv, parquet, txt file
prune_stages:
  - {num_hidden_layers: 0.875}
  - {num_hidden_layers: 0.75, hidden_size: 0.75, num_experts: 0.5}
stage_tokens: [40000, 360000]
output_dir: runs/slim
max_length: 512
per_device_train_batch_size: 8
```
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from hf_slim.data import load_training_dataset
from hf_slim.hub import save_for_hub
from hf_slim.pruning import ProgressivePlan, PruneConfig, collect_statistics, prune_progressively
from hf_slim.pruning.progressive import _model_sizes  # a config's sizes as ProgressivePlan reads them
from hf_slim.utils import atomic_directory

from .distillation_config import SlimDistillationConfig
from .distillation_trainer import SlimDistillationTrainer
from .fsdp import fsdp_requested
from .teacher import is_quantized, load_teacher, load_teacher_config


__all__ = [
    "DistillPlan",
    "DistillScriptArguments",
    "StagePlan",
    "StageResult",
    "distill_parser",
    "load_distill_config",
    "plan_distill",
    "render_distilled_card",
    "run_progressive",
]

logger = logging.get_logger("trainers.progressive")


@dataclass
class DistillScriptArguments:
    """What `hf-slim distill` does besides training: the data, the pruning stages and the token budget.

    Args:
        dataset_name (`str`): A Hub dataset, a local `.json`/`.jsonl`/`.csv`/`.parquet`/`.txt` file, or
            `"hf_slim:stdlib"` (the offline corpus of standard-library docstrings, packed to `max_length`).
        dataset_config (`str`, *optional*): Hub dataset configuration.
        dataset_split (`str`, *optional*, defaults to `"train"`): Split to train on.
        student_model_name_or_path (`str`, *optional*): Start from this student instead of the teacher.
        prune_stages (`list[dict]`): One `PruneConfig` dict per stage (sizes as fractions of, or absolute sizes
            relative to, the ORIGINAL model); an empty dict distills without pruning. Every size a stage sets must be
            strictly smaller than the model's size when that stage starts; omit a field to keep it.
        stage_tokens (`list[int]`): Training tokens of each stage (N1, N2, ...).
        calibration_samples (`int`, *optional*, defaults to 64): Calibration sequences before each pruning stage.
        num_mtp_heads (`int`, *optional*, defaults to 1): MTP depths added when the student is a stock model
            (converted to SlimMoe with `hf_slim.convert.from_hf`); 0 keeps it stock. A student without MTP heads
            trains LM + KD only: β left at its defaults is set to 0 with a notice, a β set > 0 is refused
            ([`plan_distill`]).
        final_dir (`str`, *optional*): The Hub-ready folder; defaults to `{output_dir}/final`.
        repo_id (`str`, *optional*): Name used in the model card.
        overwrite (`bool`, *optional*, defaults to `False`): Replace an existing final folder.
    """

    dataset_name: str = field(metadata={"help": "Hub dataset, local data file, or 'hf_slim:stdlib' (offline)."})
    prune_stages: list[dict[str, Any]] = field(
        default_factory=list, metadata={"help": "One PruneConfig dict per stage; {} distills without pruning."}
    )
    stage_tokens: list[int] = field(default_factory=list, metadata={"help": "Training tokens of each stage."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Dataset split to train on."})
    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from this student instead of pruning the teacher itself."}
    )
    calibration_samples: int = field(default=64, metadata={"help": "Calibration sequences before each pruning."})
    num_mtp_heads: int = field(default=1, metadata={"help": "MTP depths added to a stock student (SlimMoe convert)."})
    final_dir: str | None = field(default=None, metadata={"help": "Hub-ready output folder ({output_dir}/final)."})
    repo_id: str | None = field(default=None, metadata={"help": "Model name used in the model card."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing final folder."})

    def __post_init__(self) -> None:
        if not isinstance(self.prune_stages, list) or not all(isinstance(s, dict) for s in self.prune_stages):
            raise ValueError(f"prune_stages must be a list of PruneConfig dicts, got {self.prune_stages!r}.")
        if not self.prune_stages:
            raise ValueError("prune_stages must list at least one stage ({} distills without pruning), got [].")
        if len(self.stage_tokens) != len(self.prune_stages):
            raise ValueError(
                f"stage_tokens must give one token budget per stage: {len(self.prune_stages)} prune_stages but "
                f"stage_tokens={self.stage_tokens!r}."
            )
        for tokens in self.stage_tokens:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise ValueError(f"stage_tokens must be positive ints, got {self.stage_tokens!r}.")
        for name in ("calibration_samples", "num_mtp_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "calibration_samples" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'calibration_samples' else 0}, got {value!r}.")
        # PruneConfig validates each stage (names the field) before anything is loaded
        self.plan()

    def plan(self) -> ProgressivePlan:
        """The `ProgressivePlan` of `prune_stages` (validated by `PruneConfig`)."""
        stages = [PruneConfig.from_dict(s) for s in self.prune_stages]
        return ProgressivePlan(stages=stages)


@dataclass
class StageResult:
    """What one stage did: its pruning config, budget, steps, output folder and log history."""

    index: int
    prune_config: dict[str, Any]
    tokens: int
    steps: int
    step_offset: int
    output_dir: str
    log_history: list[dict[str, Any]]


def distill_parser() -> Any:
    """The `trl.TrlParser` of `hf-slim distill` (both dataclasses); it raises `ValueError` where argparse would exit."""
    from trl import TrlParser

    class _Parser(TrlParser):
        def error(self, message: str) -> None:  # argparse would print usage and exit; the caller words the error
            raise ValueError(message)

    parser = _Parser((DistillScriptArguments, SlimDistillationConfig), prog="hf-slim distill")
    for action in parser._actions:
        if action.dest == "prune_stages":  # on the command line each stage is a JSON object: '{"num_experts": 4}'
            action.type = _json_object
    return parser


def _json_object(text: str) -> dict[str, Any]:
    import argparse

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object such as '{{\"num_experts\": 4}}'")
    return value


def load_distill_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[DistillScriptArguments, SlimDistillationConfig]:
    """Parse [`DistillScriptArguments`] and [`SlimDistillationConfig`] with `trl.TrlParser`: the YAML at `path` (its
    `env:` mapping sets environment variables, as in TRL's scripts), then command-line `overrides` on top of it.

    Args:
        path (`str` or `os.PathLike`, *optional*): The YAML file; `None` takes every field from `overrides`.
        overrides (`list[str]`, *optional*): Command-line style fields, e.g. `["--learning_rate", "1e-4"]`.

    Raises:
        `ValueError`: unknown keys or options (named), invalid values (from either dataclass), or a missing file.
    """
    args = list(overrides)
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"config file {str(path)!r} does not exist.")
        args = ["--config", str(path), *args]
    try:
        script_args, training_args = distill_parser().parse_args_and_config(args)
    except ValueError as error:
        raise ValueError(f"{path}: {error}" if path is not None else str(error)) from None
    return script_args, training_args


def _load_dataset(script_args: DistillScriptArguments, tokenizer, max_length: int) -> tuple[Dataset, Any]:
    """The training dataset and the calibration data (texts, or the dataset itself)."""
    return load_training_dataset(
        script_args.dataset_name, tokenizer, max_length, script_args.dataset_config, script_args.dataset_split
    )


def _tokens_per_step(args: SlimDistillationConfig) -> int:
    if args.max_length is None:
        raise ValueError("max_length must be set for token budgets (tokens per step = batch x accumulation x length).")
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1) * args.max_length


def _student_source(
    teacher: PreTrainedModel, student_path: str | None, teacher_path: str | None, args: SlimDistillationConfig
) -> PreTrainedModel:
    """The model stage 1 prunes: the student at `student_path`, else the teacher itself, or (a quantized teacher's
    weights cannot be pruned) the teacher's weights loaded again without quantization."""
    if student_path:
        return AutoModelForCausalLM.from_pretrained(student_path)
    if not is_quantized(teacher):
        return teacher
    if teacher_path is None:
        raise ValueError(
            "The teacher is quantized and cannot be pruned into the student: set student_model_name_or_path, or "
            "teacher_model_name_or_path so that the student starts from the unquantized weights."
        )
    return load_teacher(teacher_path, args, quantized=False)


def _prepare_student(model: PreTrainedModel, num_mtp_heads: int) -> PreTrainedModel:
    from hf_slim.models.slim_moe import SlimMoeForCausalLM

    if isinstance(model, SlimMoeForCausalLM) or num_mtp_heads == 0:
        return model
    from hf_slim.convert import from_hf

    return from_hf(model, num_mtp_heads=num_mtp_heads)


@dataclass
class StagePlan:
    """One stage as planned from the configs: what it prunes, the model's sizes after it, its budget and steps."""

    index: int
    prune: dict[str, int]
    sizes: dict[str, int | None]
    tokens: int
    steps: int
    step_offset: int


@dataclass
class DistillPlan:
    """The checked plan of a progressive run ([`plan_distill`]): nothing in it needed a weight or a data row.

    Args:
        stages (`list[StagePlan]`): One entry per stage.
        start_sizes (`dict`): The sizes of the model stage 1 prunes.
        tokens_per_step (`int`): Batch x accumulation x processes x `max_length`.
        student_mtp_depths (`int`): MTP depths of the student as trained (0: the β terms are off).
        student (`str`): What the student is, in words (e.g. "stock qwen3_moe, converted to SlimMoe with 1 MTP head(s)").
        final_dir (`Path`): The Hub-ready folder.
        notices (`list[str]`): Settings the plan changed, in words (e.g. β set to 0).
    """

    stages: list[StagePlan]
    start_sizes: dict[str, int | None]
    tokens_per_step: int
    student_mtp_depths: int
    student: str
    final_dir: Path
    notices: list[str] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)


def _mtp_depths(config: Any) -> int:
    return int(getattr(config, "num_mtp_heads", 0) or 0) if getattr(config, "model_type", None) == "slim_moe" else 0


def _beta_is_default(args: SlimDistillationConfig) -> bool:
    defaults = {f.name: f.default for f in dataclasses.fields(SlimDistillationConfig)}
    return args.beta_start == defaults["beta_start"] and args.beta_end == defaults["beta_end"]


def _check_mtp(script_args: DistillScriptArguments, args: SlimDistillationConfig, source: Any, teacher: Any):
    """The student's MTP depths as trained, its description, and the notices; β against them (may set β to 0)."""
    from hf_slim.convert import conversion_configs

    heads = script_args.num_mtp_heads
    if source.model_type == "slim_moe":
        depths = _mtp_depths(source)
        student = f"SlimMoe with {depths} MTP head(s)"
    elif heads:
        conversion_configs(source, "slim_moe", num_mtp_heads=heads)  # a family that cannot convert fails here
        depths, student = heads, f"stock {source.model_type}, converted to SlimMoe with {heads} MTP head(s)"
    else:
        depths, student = 0, f"stock {source.model_type}, kept stock (num_mtp_heads: 0)"
    notices = []
    if args.uses_mtp and depths == 0:
        why = f"the student ({student}) has no MTP heads, so there are no MTP terms for β to weight"
        if not _beta_is_default(args):
            raise ValueError(
                f"beta_start={args.beta_start} / beta_end={args.beta_end} weight the MTP terms, but {why}. Set "
                "beta_start: 0 and beta_end: 0, or give the student MTP heads (num_mtp_heads >= 1 for a stock "
                "student; a SlimMoe student keeps its own)."
            )
        notices.append(
            f"beta_start/beta_end set from the defaults {args.beta_start}/{args.beta_end} to 0: {why} (LM + KD only). "
            "Set num_mtp_heads >= 1 (stock student) to train MTP heads, or beta_start: 0 and beta_end: 0 to silence this."
        )
        args.beta_start = args.beta_end = 0.0
    if args.uses_mtp and args.mtp_kd_target == "teacher_mtp" and _mtp_depths(teacher) < depths:
        raise ValueError(
            f"mtp_kd_target='teacher_mtp' needs a teacher with at least the student's {depths} MTP depths, but the "
            f"teacher has {_mtp_depths(teacher)}. Use mtp_kd_target='teacher_main' (the teacher's main head at "
            "position i + k)."
        )
    return depths, student, notices


def plan_distill(
    script_args: DistillScriptArguments, args: SlimDistillationConfig, teacher: PreTrainedModel | None = None
) -> DistillPlan:
    """Check a progressive run from configs alone (no weights, no data) and plan its stages.

    Checks: not under FSDP; no `teacher_logits_dir` (the students are pruned from the teacher model); the final
    folder; every stage size against the model's size when that stage starts; the token budgets (`max_length`); the
    student's MTP heads against β: with no MTP heads (a stock student with `num_mtp_heads: 0`, or a SlimMoe without
    heads), β left at its defaults is set to 0 in `args` with a notice, while a β the config sets > 0 is refused; a
    `teacher_mtp` target the teacher cannot give.

    Args:
        script_args ([`DistillScriptArguments`]), args ([`SlimDistillationConfig`]): The run's settings.
        teacher ([`~transformers.PreTrainedModel`], *optional*): The teacher, when given as a model.

    Returns:
        [`DistillPlan`]

    Raises:
        `ValueError` / `FileExistsError`: the first setting that cannot run, named.
    """
    if fsdp_requested(args):
        raise ValueError(
            "hf-slim distill (progressive prune -> distill stages) does not run under FSDP: each stage prunes and "
            "calibrates the full tensors of the previous stage's student, which FSDP holds sharded. Launch it with "
            "DDP (accelerate launch --multi_gpu) or one process, or run SlimDistillationTrainer under FSDP2 on a "
            "pruned student stage by stage (docs/distillation.md, FSDP2)."
        )
    if args.teacher_logits_dir is not None:
        raise ValueError(
            f"teacher_logits_dir={args.teacher_logits_dir!r}: hf-slim distill prunes each stage's student from the "
            "teacher model and distills from it, so it needs teacher_model_name_or_path and does not take an offline "
            "teacher. Train an already pruned student from a teacher-logits folder with SlimDistillationTrainer "
            "(docs/distillation.md, offline teacher)."
        )
    final_dir = Path(script_args.final_dir or Path(args.output_dir) / "final")
    if final_dir.exists() and any(final_dir.iterdir()) and not script_args.overwrite:
        raise FileExistsError(f"final_dir {final_dir} exists and is not empty; set overwrite: true to replace it.")
    if teacher is None:
        if args.teacher_model_name_or_path is None:
            raise ValueError("teacher_model_name_or_path must be set in the config (the model to prune and distill).")
        original_config = load_teacher_config(args.teacher_model_name_or_path, args)  # config only (cheap)
    else:
        original_config = teacher.config
    student_path = script_args.student_model_name_or_path
    start_config = AutoConfig.from_pretrained(student_path) if student_path else None
    # every stage against the sizes the model will have when it starts
    resolved = script_args.plan().check(original_config, start_config, label="prune_stages")
    depths, student, notices = _check_mtp(script_args, args, start_config or original_config, original_config)
    per_step = _tokens_per_step(args)
    sizes = dict(_model_sizes(start_config or original_config))
    start_sizes, stages, offset = dict(sizes), [], 0
    for index, (stage, tokens) in enumerate(zip(resolved, script_args.stage_tokens)):
        prune = {k: v for k, v in stage.to_dict().items() if k in _size_fields() and v is not None}
        sizes.update(prune)
        steps = max(1, math.ceil(tokens / per_step))
        stages.append(StagePlan(index + 1, prune, dict(sizes), tokens, steps, offset))
        offset += steps
    return DistillPlan(stages, start_sizes, per_step, depths, student, final_dir, notices)


def run_progressive(
    script_args: DistillScriptArguments,
    args: SlimDistillationConfig,
    teacher: PreTrainedModel | None = None,
    tokenizer: Any | None = None,
    plan: DistillPlan | None = None,
) -> tuple[Path, list[StageResult]]:
    """Run every stage (prune -> distill) and write the Hub-ready final folder.

    Args:
        script_args ([`DistillScriptArguments`]): Data, stages and budgets.
        args ([`SlimDistillationConfig`]): Training settings shared by the stages (`output_dir` is the run folder;
            stage `i` writes `{output_dir}/stage-{i}`).
        teacher ([`~transformers.PreTrainedModel`], *optional*): The teacher; loaded from
            `args.teacher_model_name_or_path` with `teacher_model_init_kwargs` and `teacher_quantization` when not
            given ([`~trainers.teacher.load_teacher`]). A quantized teacher's student starts from the same weights
            loaded unquantized (or from `student_model_name_or_path`).
        tokenizer (*optional*): The shared tokenizer; loaded from the teacher's path when not given.
        plan ([`DistillPlan`], *optional*): The result of [`plan_distill`] on these arguments (`hf-slim distill`
            prints it first); planned here, its notices logged as warnings, when not given.

    Returns:
        `tuple[Path, list[StageResult]]`: the final folder and one result per stage.

    Raises:
        `ValueError`: bad settings ([`plan_distill`]), all found from the configs before the teacher's weights or any
            data are loaded.
    """
    if plan is None:
        plan = plan_distill(script_args, args, teacher)
        for notice in plan.notices:
            logger.warning(notice)
    final_dir, teacher_path = plan.final_dir, args.teacher_model_name_or_path
    if teacher is None:
        teacher = load_teacher(teacher_path, args)  # with teacher_model_init_kwargs and teacher_quantization
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher.eval()
    dataset, calibration = _load_dataset(script_args, tokenizer, args.max_length or 1024)
    student_path = script_args.student_model_name_or_path
    student = _student_source(teacher, student_path, teacher_path, args)

    steps = [stage.steps for stage in plan.stages]
    # the teacher is loaded once, here: each stage's trainer gets the instance, not the settings to load it with
    common = dict(schedule_total_steps=sum(steps), teacher_model_init_kwargs=None, teacher_quantization=None)
    results: list[StageResult] = []

    def calibrate(model: PreTrainedModel) -> Any:
        return collect_statistics(
            model, calibration, num_samples=script_args.calibration_samples, max_length=args.max_length or 1024,
            tokenizer=tokenizer, text_column=args.dataset_text_field, show_progress=not args.disable_tqdm,
        )  # fmt: skip

    def distill(model: PreTrainedModel, index: int, stage: PruneConfig) -> PreTrainedModel:
        if model is teacher:  # a first stage that prunes nothing trains a copy, never the teacher
            model = copy.deepcopy(teacher)
        model = _prepare_student(model, script_args.num_mtp_heads)
        model.train()
        stage_dir = Path(args.output_dir) / f"stage-{index + 1}"
        offset = sum(steps[:index])
        stage_args = dataclasses.replace(
            args, output_dir=str(stage_dir), max_steps=steps[index], schedule_step_offset=offset, **common
        )
        trainer = SlimDistillationTrainer(
            model=model, teacher_model=teacher, args=stage_args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.train()
        _save_stage(trainer, stage_dir)
        history = [dict(h, global_step=h.get("step", 0) + offset) for h in trainer.state.log_history]
        results.append(
            StageResult(
                index=index + 1, prune_config=stage.to_dict(), tokens=script_args.stage_tokens[index],
                steps=steps[index], step_offset=offset, output_dir=str(stage_dir), log_history=history,
            )
        )  # fmt: skip
        return trainer.accelerator.unwrap_model(trainer.model)

    current = prune_progressively(
        student, script_args.plan(), calibrate, distill, original_config=teacher.config, after_last_stage=True,
        label="prune_stages",
    )  # fmt: skip
    if args.process_index != 0:
        return final_dir, results
    _write_final(current, teacher, tokenizer, script_args, args, results, final_dir, teacher_path)
    return final_dir, results


def _save_stage(trainer: SlimDistillationTrainer, stage_dir: Path) -> None:
    """Write a stage's model into `stage_dir` atomically: saved in a temporary folder beside it, the stage run's own
    files (checkpoints, logs) moved in after it, then swapped into place, so a failed save (a full disk) leaves the
    folder as it was and never a config without weights."""
    if not trainer.args.should_save:  # the other processes of a DDP run write nothing
        trainer.save_model(str(stage_dir))
        return
    with atomic_directory(stage_dir, overwrite=True) as tmp:
        trainer.save_model(str(tmp))
        if stage_dir.is_dir():
            for item in stage_dir.iterdir():
                if not (tmp / item.name).exists():
                    item.rename(tmp / item.name)


def _size_fields() -> tuple[str, ...]:
    from hf_slim.pruning import SIZE_FIELDS

    return tuple(SIZE_FIELDS)


_PLOT_PANELS = (
    ("LM terms (next-token CE)", ("lm", "mtp_lm")),
    ("KD terms (divergence to the teacher)", ("kd", "mtp_kd")),
    ("total = (1-λ)·LM + λ·KD + β·MTP (+ aux): rises as λ falls while LM ≫ KD", ("loss",)),
    ("loss weights λ (KD) and β (MTP)", ("lambda", "beta")),
)


def _loss_plot(results: list[StageResult], path: Path) -> dict[str, str]:
    """Write the loss curve of all stages to `path`: one panel per loss family (LM terms, KD terms, the λ-weighted
    total) and one for the weights λ and β, on a shared step axis with the stage boundaries dotted; a panel whose
    values span a decade or more is drawn on a log scale.

    Returns:
        `dict[str, str]`: panel title -> its y scale (`"linear"` or `"log"`), top to bottom.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(_PLOT_PANELS), 1, sharex=True, figsize=(7.5, 10))
    for ax, (title, keys) in zip(axes, _PLOT_PANELS):
        drawn = []
        for key in keys:
            points = [
                (h["global_step"], h[key]) for r in results for h in r.log_history
                if key in h and "train_runtime" not in h
            ]  # fmt: skip
            if points:
                ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
                drawn += [y for _, y in points]
        positive = [y for y in drawn if y > 0]
        if positive and len(positive) == len(drawn) and max(positive) >= 10 * min(positive):
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)  # no "+5.719" offset above the axis
        if not drawn:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="grey")
        for r in results[1:]:
            ax.axvline(r.step_offset + 0.5, color="grey", linestyle=":", linewidth=1)
            if ax is axes[0]:
                ax.annotate(
                    f"stage {r.index}", (r.step_offset + 0.5, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -3), textcoords="offset points", va="top", fontsize=8, color="grey",
                    bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1),
                )  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("weight" if keys[0] == "lambda" else "loss per token" + (" (log)" if ax.get_yscale() == "log" else ""))
        if drawn:
            ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("optimizer step, all stages (dotted: a new pruning stage starts)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    panels = {ax.get_title(): ax.get_yscale() for ax in axes}
    plt.close(fig)
    return panels


def render_distilled_card(
    model: PreTrainedModel,
    teacher_name: str,
    script_args: DistillScriptArguments,
    args: SlimDistillationConfig,
    results: list[StageResult],
    repo_id: str,
    base_model: str | None = "",
) -> Any:
    """Render `model_cards/distilled.md` into a `huggingface_hub.ModelCard`, its metadata from
    `hf_slim.hub.card_metadata`: the teacher as `base_model` (`base_model_relation: finetune`, distilled), its
    licence, the dataset when it is a Hub id, and a `model-index` only when the last stage logged an `eval_loss`.

    Args:
        model ([`~transformers.PreTrainedModel`]): The distilled student.
        teacher_name (`str`): The teacher's name or path.
        script_args ([`DistillScriptArguments`]), args ([`SlimDistillationConfig`]): The run's settings.
        results (`list[StageResult]`): One result per stage.
        repo_id (`str`): Model name used in the card.
        base_model (`str`, optional): The teacher's Hub id or folder for the metadata (defaults to `teacher_name`;
            `None`: none known).

    Returns:
        `huggingface_hub.ModelCard`
    """
    from huggingface_hub import ModelCard

    from hf_slim.hub import card_metadata
    from hf_slim.utils import count_parameters

    counts = count_parameters(model)
    last = {}
    for r in results:
        for h in r.log_history:
            if "kd" in h:
                last = h
    stages = [
        {
            "index": r.index,
            "prune": ", ".join(f"{k}={v}" for k, v in r.prune_config.items() if v is not None and k in _size_fields())
            or "no pruning",
            "tokens": f"{r.tokens:,}",
            "steps": r.steps,
        }
        for r in results
    ]
    # the run evaluates only with an eval dataset configured: then the last stage's last `eval_loss` is reported
    evals = [h["eval_loss"] for h in (results[-1].log_history if results else []) if "eval_loss" in h]
    measured = None
    if evals and isinstance(evals[-1], (int, float)) and math.isfinite(evals[-1]):
        measured = {"eval_loss": float(evals[-1])}
        if evals[-1] < 700:  # exp() overflows beyond
            measured["perplexity"] = math.exp(evals[-1])
    card_data, card_vars = card_metadata(
        repo_id, base_model=(teacher_name if base_model == "" else base_model) or None, base_model_relation="distill",
        datasets=[script_args.dataset_name], results=measured,
        tags=["hf-slim", "moe", "distillation", model.config.model_type],
    )  # fmt: skip
    template = Path(__file__).resolve().parents[1] / "model_cards" / "distilled.md"
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        teacher=teacher_name,
        architecture=type(model).__name__,
        total_params=f"{counts['total']:,}",
        active_params=f"{counts['active']:,}",
        num_mtp_heads=getattr(model.config, "num_mtp_heads", 0),
        stages=stages,
        total_tokens=f"{sum(r.tokens for r in results):,}",
        total_steps=sum(r.steps for r in results),
        lambda_schedule=f"{args.lambda_schedule} {args.lambda_start} -> {args.lambda_end}",
        beta_schedule=f"{args.beta_schedule} {args.beta_start} -> {args.beta_end}",
        divergence=args.divergence + (f" (jsd_beta={args.jsd_beta})" if args.divergence == "jsd" else ""),
        temperature=args.temperature,
        teacher_top_k=args.teacher_top_k,
        mtp_kd_target=args.mtp_kd_target,
        optimizer=str(args.optim.value if hasattr(args.optim, "value") else args.optim),
        learning_rate=args.learning_rate,
        lr_scheduler=str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        dataset=script_args.dataset_name,
        final_terms={k: f"{last[k]:.4f}" for k in ("lm", "kd", "mtp_lm", "mtp_kd") if k in last},
        **card_vars,
    )


def _write_final(model, teacher, tokenizer, script_args, args, results, final_dir: Path, teacher_path) -> None:
    teacher_name = teacher_path or getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__
    repo_id = script_args.repo_id or final_dir.name
    with atomic_directory(final_dir, overwrite=script_args.overwrite) as tmp:
        save_for_hub(model, tmp, processing_class=tokenizer, repo_id=repo_id, overwrite=True)
        _loss_plot(results, tmp / "loss_curve.png")
        recipe = {
            "teacher": teacher_name,
            "dataset": script_args.dataset_name,
            "stages": [dataclasses.asdict(r) | {"log_history": None} for r in results],
            "stage_tokens": script_args.stage_tokens,
            "distillation": {k: getattr(args, k) for k in _RECIPE_FIELDS},
        }
        (tmp / "distillation_recipe.json").write_text(json.dumps(recipe, indent=2, default=str))
        (tmp / "trainer_log_history.json").write_text(
            json.dumps([h for r in results for h in r.log_history], indent=2, default=str)
        )
        base_model = teacher_path or getattr(teacher.config, "_name_or_path", "") or None  # not a class name
        card = render_distilled_card(model, teacher_name, script_args, args, results, repo_id, base_model=base_model)
        card.save(tmp / "README.md")


_RECIPE_FIELDS = (
    "lambda_start", "lambda_end", "lambda_schedule", "beta_start", "beta_end", "beta_schedule", "mtp_lambda",
    "temperature", "divergence", "jsd_beta", "teacher_top_k", "mtp_kd_target", "learning_rate", "max_length",
    "per_device_train_batch_size", "gradient_accumulation_steps", "router_aux_loss_coef", "seed",
)  # fmt: skip
