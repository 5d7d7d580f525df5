"""`SlimDistillationConfig`: the TRL `SFTConfig` plus SlimQwen's distillation knobs (weights, divergence, teacher,
elastic variant sampling, progressive stage bookkeeping)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from hf_slim.losses import DIVERGENCES, SCHEDULE_KINDS, LossWeightSchedule, check_kd_options


__all__ = [
    "ELASTIC_SAMPLING",
    "ELASTIC_TEACHERS",
    "MTP_KD_TARGETS",
    "NONFINITE_LOSS",
    "SlimDistillationConfig",
    "TEACHER_PLACEMENTS",
    "TEACHER_QUANTIZATION",
]

TEACHER_QUANTIZATION = ("4bit", "8bit")
TEACHER_PLACEMENTS = ("shard", "replicate")
ELASTIC_SAMPLING = ("probabilities", "sandwich")
ELASTIC_TEACHERS = ("teacher", "full")
MTP_KD_TARGETS = ("teacher_main", "teacher_mtp")
NONFINITE_LOSS = ("error", "skip")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class SlimDistillationConfig(SFTConfig):
    r"""
    Configuration class for [`SlimDistillationTrainer`]: offline knowledge distillation of a (pruned) MoE student from
    a frozen teacher with SlimQwen's objective

        L = (1 - λ)·L_LM + λ·L_KD + β·((1 - λ)·L_MTP-LM + λ·L_MTP-KD) + router_aux_loss_coef·L_aux

    It extends TRL's [`~trl.SFTConfig`] (so data preparation, packing, chat/prompt-completion datasets and every
    [`~transformers.TrainingArguments`] field work as in `SFTTrainer`) with the fields below. The router aux-loss
    coefficient is the parent's `router_aux_loss_coef` (`None` = the student config's value, `0.0` = off).

    Parameters:
        > Loss weights (SlimQwen defaults: λ linear 1.0 -> 0.75, β cosine 0.3 -> 0.1 over training)

        lambda_start (`float`, *optional*, defaults to `1.0`): KD weight λ at the start, in [0, 1].
        lambda_end (`float`, *optional*, defaults to `0.75`): KD weight λ at the end, in [0, 1].
        lambda_schedule (`str`, *optional*, defaults to `"linear"`): `"linear"`, `"cosine"` or `"constant"`.
        beta_start (`float`, *optional*, defaults to `0.3`): MTP weight β at the start, >= 0.
        beta_end (`float`, *optional*, defaults to `0.1`): MTP weight β at the end, >= 0.
        beta_schedule (`str`, *optional*, defaults to `"cosine"`): `"linear"`, `"cosine"` or `"constant"`.
        mtp_lambda (`float`, *optional*): The KD share of the MTP terms, in [0, 1], in place of λ:
            `β·((1 - mtp_lambda)·L_MTP-LM + mtp_lambda·L_MTP-KD)`; 0 trains the MTP heads on MTP-LM only, 1 on MTP-KD
            only (SlimQwen's Table 3 ablations). None (the default) follows λ, SlimQwen's objective.

        > Divergence

        temperature (`float`, *optional*, defaults to `1.0`): Softmax temperature of both models (loss × T²).
        divergence (`str`, *optional*, defaults to `"forward_kl"`): `"forward_kl"`, `"reverse_kl"` or `"jsd"`.
        jsd_beta (`float`, *optional*, defaults to `0.5`): Teacher weight of the JSD mixture (TRL convention).
        teacher_top_k (`int`, *optional*): Keep only the teacher's top-k tokens per position (renormalised).
        kd_chunk_size (`int`, *optional*, defaults to `256`): Tokens per chunk of the chunked head losses.
        kd_recompute (`bool`, *optional*, defaults to `False`): Re-project chunks in backward (less memory held).
        mtp_kd_target (`str`, *optional*, defaults to `"teacher_main"`): MTP-KD target of student depth k at
            position i: the teacher's main head at position i + k (`"teacher_main"`), or the teacher's own MTP
            head of depth k at position i (`"teacher_mtp"`, needs a teacher with at least as many MTP depths).

        > Teacher

        teacher_model_name_or_path (`str`, *optional*): Teacher to load when the trainer gets none (or a string).
        teacher_logits_dir (`str`, *optional*): An offline teacher: a folder written by `hf-slim teacher-logits`
            ([`hf_slim.teacher_logits.write_teacher_logits`]). Its rows are the training data (leave `train_dataset`
            None), its stored top-k the KD target (the online `teacher_top_k` KD; `teacher_top_k` may keep fewer)
            and, read at position i + k, the MTP-KD target of depth k. No teacher model is loaded. Needs
            `packing=False`, `padding_free=False`, a forward KL or JSD, `mtp_kd_target="teacher_main"`.
        eval_teacher_logits_dir (`str`, *optional*): The same for the evaluation rows (leave `eval_dataset` None).
        teacher_model_init_kwargs (`dict` or `str`, *optional*): `from_pretrained` kwargs of the teacher.
        teacher_quantization (`str`, *optional*): Load the teacher in `"4bit"` or `"8bit"` with bitsandbytes.
        teacher_placement (`str`, *optional*, defaults to `"shard"`): Under FSDP2 (`accelerate launch` with an
            `fsdp_version: 2` config) only: `"shard"` shards the teacher with `fully_shard` (each block gathered for
            its forward and freed after it: teacher memory per process ~ its size / processes + one block + head);
            `"replicate"` keeps a full copy on every process (no all-gathers, teacher memory = its whole size).
            Ignored otherwise (DDP replicates the teacher, DeepSpeed ZeRO-3 shards it).

        > Elastic students

        elastic_sampling (`str`, *optional*): `"probabilities"` (one variant per micro-batch drawn with
            `elastic_variant_probabilities`) or `"sandwich"` (largest + smallest + one random variant per
            micro-batch). `None` trains the model as is. Works with gradient checkpointing; under DDP the trainer
            sets `ddp_find_unused_parameters=True` when a variant with fewer layers can be trained alone.
        elastic_variant_probabilities (`dict[str, float]` or `str`, *optional*): Variant name (`"full"` for the whole
            model) -> probability, summing to 1 (Star Elastic: 0.5 / 0.3 / 0.2).
        elastic_teacher (`str`, *optional*, defaults to `"teacher"`): What smaller variants learn from: the
            teacher model, or the student's `"full"` variant (self-distillation; the full variant still learns from
            the teacher).

        > Non-finite steps

        nonfinite_loss (`str`, *optional*, defaults to `"error"`): What happens when a loss term or the gradients of
            an optimizer step (any micro-batch of the accumulation window, on any process) hold a NaN or inf. Checked
            just before `optimizer.step()`. `"error"`: raise [`~trainers.nonfinite.NonFiniteLossError`]
            (a `FloatingPointError`) naming the global step and the non-finite terms; the step is not applied.
            `"skip"`: drop the step's gradients (the optimizer leaves the weights and its state alone), warn, and
            count it in the logged `nonfinite_skipped`. All processes take the same decision.

        > Progressive runs (set by the `hf-slim distill` runner)

        schedule_step_offset (`int`, *optional*, defaults to `0`): Optimizer steps done by earlier stages; the LR
            and λ/β schedules continue from there.
        schedule_total_steps (`int`, *optional*): Total optimizer steps of all stages; `None` = this run's steps.
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + [
        "teacher_model_init_kwargs",
        "elastic_variant_probabilities",
    ]

    # TRL's configs switch checkpointing on with `gradient_checkpointing=True`, a name transformers 5.24 deprecates for
    # `activation_checkpointing` (a FutureWarning on every config built). Same default, under the new name.
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass to save memory (defaults to True, as in TRL)."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing` (transformers 5.24)."}
    )

    # SlimQwen trained with AdamW at 4e-4 -> 3e-5 cosine; SFT's 2e-5 is a fine-tuning default.
    learning_rate: float = field(default=4e-4, metadata={"help": "The initial learning rate (SlimQwen: 4e-4)."})

    lambda_start: float = field(default=1.0, metadata={"help": "KD weight λ at the start of training, in [0, 1]."})
    lambda_end: float = field(default=0.75, metadata={"help": "KD weight λ at the end of training, in [0, 1]."})
    lambda_schedule: str = field(
        default="linear",
        metadata={"help": "Shape of λ over training.", "choices": list(SCHEDULE_KINDS)},
    )
    beta_start: float = field(default=0.3, metadata={"help": "MTP weight β at the start of training, >= 0."})
    beta_end: float = field(default=0.1, metadata={"help": "MTP weight β at the end of training, >= 0."})
    beta_schedule: str = field(
        default="cosine",
        metadata={"help": "Shape of β over training.", "choices": list(SCHEDULE_KINDS)},
    )
    mtp_lambda: float | None = field(
        default=None,
        metadata={
            "help": "KD share of the MTP terms in [0, 1] instead of λ (0: MTP-LM only, 1: MTP-KD only); None "
            "follows λ (SlimQwen's objective)."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature applied to student and teacher logits; KD terms are scaled by T^2."},
    )
    divergence: str = field(
        default="forward_kl",
        metadata={
            "help": "KD divergence: forward_kl = KL(teacher||student), reverse_kl = KL(student||teacher), jsd = "
            "generalized JSD with jsd_beta.",
            "choices": list(DIVERGENCES),
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "For divergence=jsd: teacher weight in the mixture, in [0, 1] (0 = forward KL, 1 = reverse)."},
    )
    teacher_top_k: int | None = field(
        default=None,
        metadata={"help": "Distill only the teacher's top-k tokens per position (renormalised); None = full vocab."},
    )
    kd_chunk_size: int = field(
        default=256,
        metadata={"help": "Tokens per chunk of the chunked LM/KD head losses (peak extra memory ~ chunk x vocab)."},
    )
    kd_recompute: bool = field(
        default=False,
        metadata={"help": "Re-project each chunk in the backward pass instead of keeping head gradients."},
    )
    mtp_kd_target: str = field(
        default="teacher_main",
        metadata={
            "help": "MTP-KD target: the teacher's main head at position i+k (teacher_main), or the teacher's own MTP "
            "head of depth k (teacher_mtp).",
            "choices": list(MTP_KD_TARGETS),
        },
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher model name or path, used when the trainer is given no teacher_model."},
    )
    teacher_logits_dir: str | None = field(
        default=None,
        metadata={
            "help": "Train from an offline teacher: a folder written by `hf-slim teacher-logits` (its rows are the "
            "training data, its top-k log-probabilities the KD and MTP-KD targets); no teacher model is loaded."
        },
    )
    eval_teacher_logits_dir: str | None = field(
        default=None,
        metadata={"help": "With teacher_logits_dir: a teacher-logits folder of the evaluation rows."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for AutoModelForCausalLM.from_pretrained of the teacher (dict or JSON)."},
    )
    teacher_quantization: str | None = field(
        default=None,
        metadata={"help": "Load the teacher quantized with bitsandbytes: 4bit or 8bit.", "choices": [None, "4bit", "8bit"]},
    )
    teacher_placement: str = field(
        default="shard",
        metadata={
            "help": "Under FSDP2 only: shard the teacher with fully_shard (shard) or keep a full copy on every "
            "process (replicate).",
            "choices": list(TEACHER_PLACEMENTS),
        },
    )
    elastic_sampling: str | None = field(
        default=None,
        metadata={
            "help": "Elastic student training: probabilities (one variant per micro-batch) or sandwich (largest + "
            "smallest + one random variant). None trains the model as is.",
            "choices": [None, *ELASTIC_SAMPLING],
        },
    )
    elastic_variant_probabilities: dict[str, float] | str | None = field(
        default=None,
        metadata={"help": "Variant name ('full' = whole model) -> sampling probability, summing to 1 (dict or JSON)."},
    )
    elastic_teacher: str = field(
        default="teacher",
        metadata={
            "help": "What smaller elastic variants learn from: the teacher, or the student's full variant.",
            "choices": list(ELASTIC_TEACHERS),
        },
    )
    nonfinite_loss: str = field(
        default="error",
        metadata={
            "help": "When a loss term or a gradient of an optimizer step is NaN/inf: error (raise NonFiniteLossError "
            "before optimizer.step(), weights untouched) or skip (drop that step's gradients, warn, and count it in "
            "the logged nonfinite_skipped).",
            "choices": list(NONFINITE_LOSS),
        },
    )
    schedule_step_offset: int = field(
        default=0,
        metadata={"help": "Optimizer steps of earlier progressive stages: LR and λ/β schedules continue from there."},
    )
    schedule_total_steps: int | None = field(
        default=None,
        metadata={"help": "Total optimizer steps over all progressive stages (None = this run's max steps)."},
    )

    def __post_init__(self) -> None:
        for name in ("teacher_model_init_kwargs", "elastic_variant_probabilities"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{name} must be a dict or a JSON object string, got {value!r} ({error}).") from None
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        super().__post_init__()
        self._validate()

    def _validate(self) -> None:
        # the losses check their own settings (ranges, kinds, combinations) with messages naming the field
        self.loss_weight_schedule()
        m = self.mtp_lambda
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m <= 1.0):
            raise ValueError(f"mtp_lambda must be a number in [0, 1] or None (follow λ), got {m!r}.")
        check_kd_options(
            self.divergence, self.temperature, self.jsd_beta, self.teacher_top_k, self.kd_chunk_size,
            chunk_size_name="kd_chunk_size",
        )  # fmt: skip
        if self.mtp_kd_target not in MTP_KD_TARGETS:
            raise ValueError(f"mtp_kd_target must be one of {MTP_KD_TARGETS}, got {self.mtp_kd_target!r}.")
        if self.teacher_quantization is not None and self.teacher_quantization not in TEACHER_QUANTIZATION:
            raise ValueError(
                f"teacher_quantization must be None or one of {TEACHER_QUANTIZATION}, got {self.teacher_quantization!r}."
            )
        if self.teacher_placement not in TEACHER_PLACEMENTS:
            raise ValueError(
                f"teacher_placement must be one of {TEACHER_PLACEMENTS} ('shard': fully_shard the teacher under FSDP2, "
                f"'replicate': a full copy on every process), got {self.teacher_placement!r}."
            )
        if self.teacher_model_init_kwargs is not None and not isinstance(self.teacher_model_init_kwargs, dict):
            raise ValueError(
                f"teacher_model_init_kwargs must be a dict (or a JSON object string), got {self.teacher_model_init_kwargs!r}."
            )
        if self.teacher_quantization is not None and "quantization_config" in (self.teacher_model_init_kwargs or {}):
            raise ValueError(
                f"teacher_quantization={self.teacher_quantization!r} and teacher_model_init_kwargs['quantization_config'] "
                "are both set; set only one of them."
            )
        if self.nonfinite_loss not in NONFINITE_LOSS:
            raise ValueError(
                f"nonfinite_loss must be one of {NONFINITE_LOSS} ('error': stop before the optimizer step, 'skip': "
                f"skip the step and count it), got {self.nonfinite_loss!r}."
            )
        self._validate_elastic()
        self._validate_offline_teacher()
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2
        ):
            raise ValueError(
                f"max_length must be None or an int >= 2 (a row needs two tokens to have a next-token target), got "
                f"{self.max_length!r}."
            )
        if isinstance(self.schedule_step_offset, bool) or not isinstance(self.schedule_step_offset, int) or (
            self.schedule_step_offset < 0
        ):
            raise ValueError(f"schedule_step_offset must be an int >= 0, got {self.schedule_step_offset!r}.")
        if self.schedule_total_steps is not None:
            total = self.schedule_total_steps
            if isinstance(total, bool) or not isinstance(total, int) or total < 1:
                raise ValueError(f"schedule_total_steps must be None or an int >= 1, got {total!r}.")
            if total <= self.schedule_step_offset:
                raise ValueError(
                    f"schedule_total_steps={total} must be larger than schedule_step_offset={self.schedule_step_offset} "
                    "(the steps of all stages including this one)."
                )

    def _validate_offline_teacher(self) -> None:
        if self.teacher_logits_dir is None:
            if self.eval_teacher_logits_dir is not None:
                raise ValueError(
                    f"eval_teacher_logits_dir={self.eval_teacher_logits_dir!r} is set but teacher_logits_dir is None; "
                    "set teacher_logits_dir (the training rows' teacher logits) too."
                )
            return
        conflicts = [
            name for name in ("teacher_model_name_or_path", "teacher_model_init_kwargs", "teacher_quantization")
            if getattr(self, name)
        ]  # fmt: skip
        if conflicts:
            raise ValueError(
                f"teacher_logits_dir={self.teacher_logits_dir!r} trains with no teacher model, but {conflicts[0]} is "
                "set; unset it (the teacher's top-k is read from the folder). hf-slim distill prunes its students "
                "from the teacher model and does not take teacher_logits_dir."
            )
        if self.mtp_kd_target != "teacher_main":
            raise ValueError(
                f"mtp_kd_target={self.mtp_kd_target!r} needs the teacher's MTP heads, which a teacher-logits folder "
                "does not hold; use mtp_kd_target='teacher_main' (MTP-KD reads the stored top-k at position i + k)."
            )
        for name in ("packing", "padding_free"):
            if getattr(self, name):
                raise ValueError(
                    f"{name}=True cannot be used with teacher_logits_dir: the folder's rows are trained as stored, one "
                    f"per sequence, so the teacher's positions line up. Set {name}=False."
                )
        if self.divergence == "reverse_kl" or (self.divergence == "jsd" and self.jsd_beta == 1.0):
            raise ValueError(
                f"divergence={self.divergence!r}" + (" with jsd_beta=1" if self.divergence == "jsd" else "")
                + " cannot be used with teacher_logits_dir: the stored teacher is a top-k distribution, zero outside "
                "its k tokens, so KL(student || teacher) is infinite. Use divergence='forward_kl', or 'jsd' with "
                "jsd_beta < 1."
            )

    def _validate_elastic(self) -> None:
        if self.elastic_sampling is not None and self.elastic_sampling not in ELASTIC_SAMPLING:
            raise ValueError(f"elastic_sampling must be None or one of {ELASTIC_SAMPLING}, got {self.elastic_sampling!r}.")
        if self.elastic_teacher not in ELASTIC_TEACHERS:
            raise ValueError(f"elastic_teacher must be one of {ELASTIC_TEACHERS}, got {self.elastic_teacher!r}.")
        probs = self.elastic_variant_probabilities
        if probs is not None:
            if not isinstance(probs, dict) or not probs:
                raise ValueError(
                    f"elastic_variant_probabilities must be a non-empty dict of variant name -> probability, got {probs!r}."
                )
            for name, p in probs.items():
                if not isinstance(name, str) or not _is_number(p) or p < 0:
                    raise ValueError(
                        f"elastic_variant_probabilities[{name!r}] must be a number >= 0 keyed by a variant name, got {p!r}."
                    )
            total = sum(float(p) for p in probs.values())
            if abs(total - 1.0) > 1e-6:
                raise ValueError(
                    f"elastic_variant_probabilities must sum to 1, got {total:g} for {probs!r}; e.g. "
                    "{'full': 0.5, 'medium': 0.3, 'small': 0.2}."
                )
        if self.elastic_sampling == "probabilities" and probs is None:
            raise ValueError(
                "elastic_sampling='probabilities' needs elastic_variant_probabilities (variant name -> probability, "
                "summing to 1), got None."
            )
        if self.elastic_sampling is None and probs is not None:
            raise ValueError(
                f"elastic_variant_probabilities={probs!r} is set but elastic_sampling is None; set "
                f"elastic_sampling to one of {ELASTIC_SAMPLING}."
            )

    def loss_weight_schedule(self) -> LossWeightSchedule:
        """The λ/β schedule of these settings.

        Returns:
            [`~hf_slim.losses.LossWeightSchedule`]
        """
        return LossWeightSchedule(
            lambda_start=self.lambda_start,
            lambda_end=self.lambda_end,
            lambda_schedule=self.lambda_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
        )

    @property
    def uses_mtp(self) -> bool:
        """Whether β is ever > 0, i.e. the MTP terms are part of the objective."""
        return self.beta_start > 0 or self.beta_end > 0
