"""`SlimDistillationTrainer`: TRL-style offline distillation of a (pruned) MoE student with MTP heads.

The trainer is TRL's `SFTTrainer` (data preparation, collator, PEFT, packing, chat data) with `compute_loss` replaced
by SlimQwen's objective built from the pure, chunked loss functions of `hf_slim.losses`:

    L = (1 - λ)·L_LM + λ·L_KD + β·((1 - λ)·L_MTP-LM + λ·L_MTP-KD) + router_aux_loss_coef·L_aux

Neither model's `[batch, seq, vocab]` logits are built: the student runs with `logits_to_keep=1` while a forward hook
on its decoder captures the final hidden states, the teacher runs only its decoder, and every vocabulary-sized term is
projected a chunk of tokens at a time from hidden states and the `lm_head` weight.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.optimization import get_scheduler
from trl import SFTTrainer

from hf_slim.losses import distillation_objective
from hf_slim.losses.options import check_same_vocabulary
from hf_slim.models.slim_moe.configuration_slim_moe import FULL_VARIANT

from .checkpointing import latest_complete_checkpoint, write_training_args_json
from .checks import check_batch_split, check_dataset_columns, check_prepared_dataset
from .distillation_config import SlimDistillationConfig
from .fsdp import fsdp2_plugin, fsdp_requested, is_fsdp2_model, shard_student
from .nonfinite import NonFiniteGuard, NonFiniteLossError
from .offline_teacher import TEACHER_ROW, OfflineTeacher
from .teacher import load_teacher, prepare_teacher


__all__ = [
    "FULL_VARIANT",
    "NonFiniteLossError",
    "SlimDistillationTrainer",
    "elastic_variant_names",
    "sample_elastic_variants",
]



# ----------------------------------------------------------------------------------------------------------------
# Helpers (pure, tested on their own)
# ----------------------------------------------------------------------------------------------------------------


def elastic_variant_names(model: nn.Module) -> list[str]:
    """Variant names of an elastic SlimMoe model, smallest first, ending with `"full"`.

    Args:
        model (`nn.Module`): A model whose `config.elastic` holds nested variants (see `hf_slim.elastic`).

    Returns:
        `list[str]`: e.g. `["small", "medium", "full"]`.

    Raises:
        `ValueError`: the model has no elastic variants.
    """
    from hf_slim.elastic import ElasticConfig

    config = _unwrap(model).config
    return [*ElasticConfig.from_model_config(config).names, FULL_VARIANT]


def sample_elastic_variants(
    names: Sequence[str],
    sampling: str,
    probabilities: dict[str, float] | None,
    seed: int,
    step: int,
    micro_step: int = 0,
) -> list[str]:
    """Variants trained on one micro-batch, a pure function of `(seed, step, micro_step)`.

    The draw is the same on every process (so DDP ranks run the same variants) and again after
    `resume_from_checkpoint`.

    Args:
        names (`Sequence[str]`): Variant names, smallest first, the largest (`"full"`) last.
        sampling (`str`): `"probabilities"`: one variant drawn with `probabilities`; `"sandwich"`: the largest, the
            smallest and one other drawn uniformly (when there are more than two variants).
        probabilities (`dict[str, float]`, *optional*): Variant -> probability (needed for `"probabilities"`).
        seed (`int`): Run seed.
        step (`int`): Optimizer step.
        micro_step (`int`, *optional*, defaults to 0): Micro-batch index within the step (gradient accumulation).

    Returns:
        `list[str]`: the variants, largest first.
    """
    names = list(names)
    rng = random.Random(f"{seed}:{step}:{micro_step}")
    if sampling == "probabilities":
        if not probabilities:
            raise ValueError("sampling='probabilities' needs probabilities (variant -> probability), got none.")
        keys = list(probabilities)
        return [rng.choices(keys, weights=[float(probabilities[k]) for k in keys], k=1)[0]]
    if sampling == "sandwich":
        if len(names) < 2:
            raise ValueError(f"sampling='sandwich' needs at least two variants, got {names}.")
        chosen = [names[-1], names[0]]
        middle = names[1:-1]
        if middle:
            chosen.insert(1, rng.choice(middle))
        return chosen
    raise ValueError(f"sampling must be 'probabilities' or 'sandwich', got {sampling!r}.")


def _unwrap(model: nn.Module) -> nn.Module:
    """The `PreTrainedModel` under DDP / PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = _unwrap(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(
            f"{type(_unwrap(model)).__name__} has no output embeddings (get_output_embeddings() is None); the "
            "distillation trainer needs a causal LM with an lm_head."
        )
    return head.weight, getattr(head, "bias", None)


def depth_labels(labels: torch.Tensor, position_ids: torch.Tensor | None, depth: int) -> torch.Tensor:
    """`labels` with the targets of depth `depth` that lie in another packed document set to -100.

    A head of depth `k` at position `i` predicts token `i + 1 + k`. In padding-free packing (TRL's `bfd`, or
    `padding_free=True`) several documents share one row and `position_ids` restart at 0 for each; the target of
    `labels[j]` then belongs to the same document as its source position `j - 1 - k` exactly when
    `position_ids[j] >= 1 + k`. TRL's collator already masks `position_ids == 0` (depth 0); the MTP depths need
    the wider mask. Without `position_ids` (no packing, or `packing_strategy="wrapped"`, which has no document
    boundaries) `labels` is returned as is.

    Args:
        labels (`torch.Tensor`): Unshifted labels `[B, T]`.
        position_ids (`torch.Tensor`, *optional*): `[B, T]` (or `[1, T]`) positions that restart per document.
        depth (`int`): Head depth `k >= 0` (0 = main head).

    Returns:
        `torch.Tensor`: labels `[B, T]` (a new tensor when anything is masked).
    """
    if position_ids is None:
        return labels
    position_ids = position_ids.to(labels.device).expand_as(labels)
    return labels.masked_fill(position_ids < 1 + depth, -100)


def _num_mtp_depths(model: nn.Module) -> int:
    base = _unwrap(model)
    return int(getattr(base.config, "num_mtp_heads", 0) or 0) if getattr(base, "mtp", None) is not None else 0


def unused_parameter_reasons(model: nn.Module | str, args: SlimDistillationConfig) -> list[str]:
    """Why some training step of this student/config leaves trainable parameters without gradient (empty: none).

    Args:
        model (`nn.Module` or `str`): The student, or a path to its config.
        args ([`SlimDistillationConfig`]): The run's settings.

    Returns:
        `list[str]`: one sentence per cause (a layer-dropping variant that can run alone, MTP heads unused at β = 0).
    """
    if isinstance(model, str):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code)
    else:
        config = _unwrap(model).config
    reasons = []
    if args.elastic_sampling == "probabilities" and getattr(config, "elastic", None):
        from hf_slim.elastic import ElasticConfig

        variants = ElasticConfig.from_model_config(config).variants
        total = int(config.num_hidden_layers)
        for name, p in (args.elastic_variant_probabilities or {}).items():
            layers = (variants.get(name) or {}).get("num_hidden_layers")
            kept = len(layers) if isinstance(layers, (list, tuple)) else layers
            if float(p) > 0 and isinstance(kept, int) and kept < total:
                reasons.append(
                    f"elastic variant {name!r} (probability {p}) keeps {kept} of {total} layers and is trained alone "
                    "in its steps"
                )
    if not args.uses_mtp and int(getattr(config, "num_mtp_heads", 0) or 0) > 0:
        reasons.append(
            f"beta_start = beta_end = 0 leaves the student's {config.num_mtp_heads} MTP heads out of every step"
        )
    return reasons


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


class SlimDistillationTrainer(SFTTrainer):
    """Offline knowledge distillation of a (pruned) MoE student from a frozen teacher, SlimQwen style.

    Subclass of TRL's [`~trl.SFTTrainer`] that only replaces `compute_loss` (plus teacher handling, logging and the
    continuing LR schedule of progressive runs). Argument names follow TRL's GKD trainer.

    Args:
        model ([`~transformers.PreTrainedModel`] or `str`):
            The student: any causal LM (a pruned checkpoint of the teacher's architecture, or a `SlimMoeForCausalLM`
            with MTP heads when `beta_start`/`beta_end` > 0), or a path to load.
        teacher_model ([`~transformers.PreTrainedModel`] or `str`, *optional*):
            The teacher: any causal LM sharing the student's vocabulary, or a path. Defaults to
            `args.teacher_model_name_or_path`. It is frozen, kept in eval mode, run under `torch.no_grad()` and not
            saved in checkpoints.
        args ([`SlimDistillationConfig`]):
            Training arguments.
        data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks, optimizers,
        optimizer_cls_and_kwargs, preprocess_logits_for_metrics, peft_config, formatting_func:
            As in [`~trl.SFTTrainer`]. The dataset needs an `input_ids`, text, chat or prompt/completion column.

    Logged (averaged over tokens of the logging window, all processes): `lm`, `kd`, `mtp_lm`, `mtp_kd` (depth
    means), `mtp_lm_{k}`, `mtp_kd_{k}` per depth, `aux` (router load balancing), `lambda`, `beta`, and with elastic
    sampling the same terms per variant as `{variant}/{term}`; with `nonfinite_loss="skip"` also
    `nonfinite_skipped`, the optimizer steps skipped so far in this `train()` call (also the attribute
    `nonfinite_skipped`).

    Non-finite steps: before each `optimizer.step()` the trainer checks every loss term of the step's micro-batches
    and the gradients on every process; a NaN/inf raises [`NonFiniteLossError`] (default) or, with
    `nonfinite_loss="skip"`, drops the step's gradients.
    """

    _tag_names = ["trl", "hf-slim", "distillation"]
    _name = "SlimDistillation"

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
        args: SlimDistillationConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: Any | None = None,
        formatting_func: Callable | None = None,
    ):
        if model is None:
            raise ValueError("model (the student) is required: a PreTrainedModel or a path to load.")
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "student"
            args = SlimDistillationConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-distilled")
        elif not isinstance(args, SlimDistillationConfig):
            raise TypeError(
                f"args must be a SlimDistillationConfig, got {type(args).__name__}; build one with "
                "SlimDistillationConfig(output_dir=..., **fields)."
            )
        self._offline: OfflineTeacher | None = None
        if args.teacher_logits_dir is not None:  # no teacher model: the folder's rows and their stored top-k
            if teacher_model is not None:
                raise ValueError(
                    f"teacher_model is given but teacher_logits_dir={args.teacher_logits_dir!r} trains from stored "
                    "teacher logits; pass one of them."
                )
            self._offline = OfflineTeacher(args, processing_class)
            train_dataset, eval_dataset = self._offline.datasets(train_dataset, eval_dataset)
        check_dataset_columns(train_dataset, args.dataset_text_field, formatting_func, "train_dataset")
        if isinstance(eval_dataset, dict):
            for key, dataset in eval_dataset.items():
                check_dataset_columns(dataset, args.dataset_text_field, formatting_func, f"eval_dataset[{key!r}]")
        else:
            check_dataset_columns(eval_dataset, args.dataset_text_field, formatting_func, "eval_dataset")
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None and self._offline is None:
            raise ValueError(
                "No teacher: pass teacher_model=... (a model or a path) or set teacher_model_name_or_path in "
                "SlimDistillationConfig."
            )
        if isinstance(teacher_model, str):
            teacher_model = load_teacher(teacher_model, args, processing_class)
        elif teacher_model is not None and (args.teacher_model_init_kwargs or args.teacher_quantization):
            raise ValueError(
                "teacher_model_init_kwargs / teacher_quantization are set but teacher_model is already instantiated; "
                "pass the teacher as a path (or teacher_model_name_or_path) to have it loaded with them."
            )

        check_batch_split(args, has_eval=eval_dataset is not None)
        self._fit_ddp_find_unused_parameters(model, args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        vocab = _unwrap(self.model).get_input_embeddings().weight.shape[0]
        for name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            for key, part in dataset.items() if isinstance(dataset, dict) else [(None, dataset)]:
                check_prepared_dataset(part, name if key is None else f"{name}[{key!r}]", vocab)
        # compute_loss normalises every term by `num_items_in_batch` itself, so the Trainer must count the tokens of
        # the whole accumulation window and must not divide the loss by the accumulation steps again.
        self.model_accepts_loss_kwargs = True

        if self._offline is not None:
            self._offline.check_vocabulary(_head(self.model)[0].shape[0])
            self.data_collator = self._offline.wrap_collator(self.data_collator)
        else:
            self._check_pair(self.model, teacher_model, args)
        if fsdp2_plugin(self.accelerator) is not None:
            # before the Trainer builds the optimizer on the sharded parameters; accelerate leaves a sharded model as
            # it is (trainers/fsdp.py says why the trainer shards it itself)
            shard_student(self.model, self.accelerator)
        self.teacher_model = None if teacher_model is None else prepare_teacher(
            teacher_model, self.accelerator, self.is_deepspeed_enabled, placement=args.teacher_placement
        )

        self.loss_weights = args.loss_weight_schedule()
        self.num_mtp_depths = _num_mtp_depths(self.model)
        self._elastic_names: list[str] | None = None
        if args.elastic_sampling is not None:
            self._elastic_names = self._check_elastic(self.model, args)
        self._mtp_num_items: dict[int, torch.Tensor] = {}
        self._micro = (-1, 0)  # (global step, micro-batches seen in it)
        self._term_sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self._term_counts: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}

        # every loss term a step can log (the same on every process, so the per-step flags reduce as one tensor)
        depths = range(1, self.num_mtp_depths + 1)
        terms = ["lm", "kd", *(f"mtp_lm_{k}" for k in depths), *(f"mtp_kd_{k}" for k in depths), "aux", "total"]
        self._nonfinite = NonFiniteGuard(self, terms)
        self.add_callback(self._nonfinite)

    @property
    def nonfinite_skipped(self) -> int:
        """Optimizer steps skipped for NaN/inf (`nonfinite_loss="skip"`) since `train()` started."""
        return self._nonfinite.skipped

    # ---- what goes to disk --------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:  # the latest checkpoint a killed save did not leave incomplete
            resume_from_checkpoint = latest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True found no complete checkpoint-N folder in {self.args.output_dir}."
                )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:  # the settings as JSON, no pickle in a model folder
            write_training_args_json(self.args, output_dir or self.args.output_dir)

    # ---- construction ------------------------------------------------------------------------------------------
    def _check_pair(self, student: nn.Module, teacher: nn.Module, args: SlimDistillationConfig) -> None:
        s_weight, _ = _head(student)
        t_weight, _ = _head(teacher)
        v_s, v_t = s_weight.shape[0], t_weight.shape[0]
        check_same_vocabulary(
            v_s,
            v_t,
            student="the student's lm_head",
            teacher="the teacher's",
            fix="Use a teacher with the student's tokenizer; if they share the tokenizer and only the padded head rows "
            f"differ, resize one model first (e.g. student.resize_token_embeddings({v_t})).",
        )
        tokenizer = getattr(self, "_tokenizer", None)
        if tokenizer is not None and len(tokenizer) > v_s:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the models' vocabulary has {v_s} rows; token ids past "
                f"{v_s - 1} cannot be scored. Use the tokenizer the teacher and student were trained with, or resize "
                "both models' embeddings to len(tokenizer)."
            )
        n_student = _num_mtp_depths(student)
        if args.uses_mtp and n_student == 0:
            raise ValueError(
                f"beta_start={args.beta_start} / beta_end={args.beta_end} weight the MTP terms, but the student "
                f"({type(_unwrap(student)).__name__}) has no MTP heads. Set beta_start=0 and beta_end=0, or use a "
                "SlimMoe student with num_mtp_heads > 0 (hf_slim.convert.from_hf(model, num_mtp_heads=1) or "
                "`hf-slim convert --num-mtp-heads 1`)."
            )
        if args.mtp_kd_target == "teacher_mtp" and args.uses_mtp:
            n_teacher = _num_mtp_depths(teacher)
            if n_teacher < n_student:
                raise ValueError(
                    f"mtp_kd_target='teacher_mtp' needs a teacher with at least the student's {n_student} MTP depths, "
                    f"but the teacher has {n_teacher}. Use mtp_kd_target='teacher_main' (the teacher's main head at "
                    "position i + k)."
                )

    @staticmethod
    def _fit_ddp_find_unused_parameters(model: nn.Module | str, args: SlimDistillationConfig) -> None:
        """Turn DDP's `find_unused_parameters` on when some step can leave trainable parameters without gradient.

        That happens when `elastic_sampling="probabilities"` can draw a variant with fewer layers (its step never
        runs the dropped layers; width, head and expert variants slice tensors that still all get a gradient), and
        when β = 0 leaves a student's MTP heads out of every step. `SFTConfig` enables gradient checkpointing by
        default, and then the Trainer's default is `find_unused_parameters=False`, with which DDP stops at the next
        step ("Expected to have finished reduction in the prior iteration ..."). `None` is set to `True`; an
        explicit `False` on more than one process is an error, except under FSDP, which has no such setting (a unit
        that does not run in a step simply neither gathers nor reduces).
        """
        reasons = unused_parameter_reasons(model, args)
        if not reasons:
            return
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = True
        elif not args.ddp_find_unused_parameters and args.world_size > 1 and not fsdp_requested(args):
            raise ValueError(
                f"ddp_find_unused_parameters=False, but {'; '.join(reasons)}: those parameters get no gradient in "
                "such a step and DistributedDataParallel then fails. Set ddp_find_unused_parameters=True (or leave "
                "it None and the trainer sets it), or use elastic_sampling='sandwich', which runs the full variant "
                "every step."
            )

    @staticmethod
    def _check_elastic(model: nn.Module, args: SlimDistillationConfig) -> list[str]:
        try:
            names = elastic_variant_names(model)
        except ValueError as error:
            raise ValueError(
                f"elastic_sampling={args.elastic_sampling!r} needs an elastic student: {error}"
            ) from None
        for name in args.elastic_variant_probabilities or {}:
            if name not in names:
                raise ValueError(
                    f"elastic_variant_probabilities has variant {name!r}, which the student does not have; valid "
                    f"variants: {names}."
                )
        if args.elastic_sampling == "sandwich" and len(names) < 2:
            raise ValueError(f"elastic_sampling='sandwich' needs at least one variant besides 'full', got {names}.")
        return names

    # ---- token counts for gradient accumulation ----------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        num_items = super()._get_num_items_in_batch(batch_samples, device)
        # MTP depth k scores labels[:, 1 + k:], so it has fewer targets than the main head: count them exactly.
        self._mtp_num_items = {}
        if num_items is not None and self.num_mtp_depths and batch_samples and "labels" in batch_samples[0]:
            for k in range(1, self.num_mtp_depths + 1):
                count = sum(
                    depth_labels(batch["labels"], batch.get("position_ids"), k)[..., 1 + k :].ne(-100).sum()
                    for batch in batch_samples
                )
                count = torch.as_tensor(count, device=device)
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    count = self.accelerator.gather(count).sum()
                self._mtp_num_items[k] = count
        return num_items

    # ---- schedules ---------------------------------------------------------------------------------------------
    def _schedule_steps(self) -> tuple[int, int]:
        offset = self.args.schedule_step_offset
        total = self.args.schedule_total_steps or offset + max(int(self.state.max_steps or 0), 1)
        return offset + int(self.state.global_step), total

    def current_loss_weights(self) -> tuple[float, float]:
        """(λ, β) at the current optimizer step, counting the steps of earlier progressive stages.

        Returns:
            `tuple[float, float]`: `(λ, β)`.
        """
        step, total = self._schedule_steps()
        return self.loss_weights.at_step(min(step, total), total)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._offline is not None and TEACHER_ROW not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, TEACHER_ROW]  # kept by remove_unused_columns

    # ---- FSDP2: the optimizer's parameters ---------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if is_fsdp2_model(self.model):
            # The student is sharded already, so accelerate's FSDP2 prepare maps the optimizer's parameters to the
            # model's by the data pointer of each local shard, and all empty shards (a tensor with fewer rows than
            # processes, e.g. a [1, hidden] shared-expert gate) share one: they would collapse into one parameter,
            # stepped several times, with a wrong state in checkpoints. Kept here, put back after prepare.
            self._fsdp2_optimizer_params = [list(group["params"]) for group in optimizer.param_groups]
        return optimizer

    def _restore_fsdp2_optimizer_params(self) -> None:
        saved = self.__dict__.pop("_fsdp2_optimizer_params", None)
        if saved is None or self.optimizer is None:
            return
        for group, params in zip(self.optimizer.param_groups, saved):
            group["params"] = params

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        # the Trainer creates the scheduler right after accelerator.prepare and before it loads a checkpoint's
        # optimizer state: the moment to undo prepare's parameter mapping (see create_optimizer)
        self._restore_fsdp2_optimizer_params()
        offset, total = self.args.schedule_step_offset, self.args.schedule_total_steps
        if self.lr_scheduler is not None or (offset == 0 and total is None):
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer if optimizer is not None else self.optimizer
        total = total or offset + num_training_steps
        base = get_scheduler(
            self.args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=self.args.get_warmup_steps(total),
            num_training_steps=total,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )
        if not isinstance(base, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(
                f"lr_scheduler_type={self.args.lr_scheduler_type!r} cannot continue across progressive stages "
                "(schedule_step_offset/schedule_total_steps need a LambdaLR schedule); use 'linear', 'cosine', "
                "'cosine_with_min_lr', 'constant', 'constant_with_warmup' or 'warmup_stable_decay'."
            )
        functions = list(base.lr_lambdas)
        for group, lr in zip(optimizer.param_groups, base.base_lrs):
            group["lr"] = lr
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [lambda step, f=f: f(step + offset) for f in functions]
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- forward passes ----------------------------------------------------------------------------------------
    @staticmethod
    def _forward_hidden(
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        *,
        want_mtp: bool,
        want_aux: bool,
        variant: str | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None]:
        """Final hidden states (after the last norm), MTP hidden states and router aux loss of `model`, computing
        the logits of the last position only (`logits_to_keep=1`)."""
        decoder = _unwrap(model).get_decoder()
        captured: dict[str, torch.Tensor] = {}

        def hook(module, args, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        kwargs = dict(inputs, use_cache=False, logits_to_keep=1)
        if want_mtp:
            kwargs.update(return_mtp=True, return_mtp_logits=False)
        if want_aux:
            kwargs["output_router_logits"] = True
        if variant is not None and variant != FULL_VARIANT:
            kwargs["elastic_variant"] = variant
        handle = decoder.register_forward_hook(hook)
        try:
            outputs = model(**kwargs)
        finally:
            handle.remove()
        mtp = tuple(getattr(outputs, "mtp_hidden_states", None) or ()) if want_mtp else ()
        return captured["hidden"], mtp, getattr(outputs, "aux_loss", None) if want_aux else None

    @torch.no_grad()
    def _teacher_hidden(self, inputs: dict[str, torch.Tensor], want_mtp: bool) -> tuple[torch.Tensor, tuple]:
        teacher = self.teacher_model
        # a teacher sharded with fully_shard runs through its root module, whose forward gathers the root unit
        if want_mtp or is_fsdp2_model(teacher):
            hidden, mtp, _ = self._forward_hidden(teacher, inputs, want_mtp=want_mtp, want_aux=False)
            return hidden, mtp
        decoder = _unwrap(teacher).get_decoder()
        return decoder(**inputs, use_cache=False).last_hidden_state, ()

    # ---- loss --------------------------------------------------------------------------------------------------
    def _micro_index(self) -> int:
        step = int(self.state.global_step)
        last, seen = self._micro
        seen = seen + 1 if last == step else 0
        self._micro = (step, seen)
        return seen

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        forward_inputs = {k: v for k, v in inputs.items() if k not in ("labels", TEACHER_ROW)}
        attention_mask = inputs.get("attention_mask")
        args = self.args
        lam, beta = self.current_loss_weights()
        depths = self.num_mtp_depths if args.uses_mtp else 0
        teacher_mtp = depths > 0 and args.mtp_kd_target == "teacher_mtp"

        if mode == "train" and self._elastic_names is not None:
            variants = sample_elastic_variants(
                self._elastic_names,
                args.elastic_sampling,
                args.elastic_variant_probabilities,
                args.seed,
                int(self.state.global_step),
                self._micro_index(),
            )
            variants = sorted(variants, key=lambda v: v != FULL_VARIANT)  # the full variant first (self-KD reuse)
        else:
            variants = [None]

        if self._offline is not None:  # the stored top-k stands in for the teacher's hidden states and head
            teacher_hidden, rest = self._offline.top_k(mode, inputs)
            (t_weight, t_bias), teacher_mtp_hidden = (None, None), ()
            real = torch.ones_like(rest) if attention_mask is None else attention_mask.to(rest.dtype)
            self._add(mode, "teacher_top_k_mass", (-torch.expm1(rest) * real).sum(), real.sum())  # logged coverage
        else:
            teacher_hidden, teacher_mtp_hidden = self._teacher_hidden(forward_inputs, teacher_mtp)
            t_weight, t_bias = _head(self.teacher_model)
        # per depth, the labels without targets in another packed document (padding-free packing)
        labels_at = [depth_labels(labels, inputs.get("position_ids"), k) for k in range(depths + 1)]
        options = dict(
            temperature=args.temperature, divergence=args.divergence, jsd_beta=args.jsd_beta,
            teacher_top_k=args.teacher_top_k, chunk_size=args.kd_chunk_size, recompute=args.kd_recompute,
            attention_mask=attention_mask, num_items_in_batch=num_items_in_batch, mtp_num_items=self._mtp_num_items,
        )  # fmt: skip
        full_hidden = None
        total = None
        for variant in variants:
            hidden, mtp_hidden, aux = self._forward_hidden(
                model, forward_inputs, want_mtp=depths > 0, want_aux=self.aux_loss_enabled, variant=variant
            )
            # read after the forward: under FSDP2 it is the forward that gathers lm_head.weight (trainers/fsdp.py)
            s_weight, s_bias = _head(model)
            if variant == FULL_VARIANT:
                full_hidden = hidden.detach()
            kd_source = (teacher_hidden, t_weight, t_bias, teacher_mtp_hidden)
            if variant not in (None, FULL_VARIANT) and args.elastic_teacher == "full":
                if full_hidden is None:
                    with torch.no_grad():
                        full_hidden, _, _ = self._forward_hidden(model, forward_inputs, want_mtp=False, want_aux=False)
                kd_source = (full_hidden, s_weight.detach(), None if s_bias is None else s_bias.detach(), ())
            kd_hidden, kd_weight, kd_bias, kd_mtp_hidden = kd_source
            loss, raw = distillation_objective(
                hidden, s_weight, kd_hidden, kd_weight, labels_at, lam=lam, beta=beta, mtp_lam=args.mtp_lambda,
                mtp_hidden=mtp_hidden, teacher_mtp_hidden=kd_mtp_hidden, head_bias=s_bias, teacher_head_bias=kd_bias,
                **options,
            )
            # Like SFTTrainer: `num_items_in_batch` counts the tokens of every rank, and DDP averages the gradients.
            if args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if aux is not None:
                # a per-micro-batch mean: average it over the accumulation window like SFTTrainer does
                steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                loss = loss + self.router_aux_loss_coef * aux.to(loss.device) / steps
                raw["aux"] = (aux.detach().float(), torch.ones((), device=aux.device))
            loss = loss / len(variants)
            total = loss if total is None else total + loss
            if mode == "train":
                self._nonfinite.flag({name: value for name, (value, _) in raw.items()})
            # unprefixed: over every student forward of the step; with elastic sampling also per variant
            self._record(mode, raw, prefix="")
            if variant is not None:
                self._record(mode, raw, prefix=f"{variant}/")
        if mode == "train":
            self._nonfinite.flag({"total": total})
        self._metrics[mode]["lambda"].append(lam)
        self._metrics[mode]["beta"].append(beta)
        if attention_mask is not None:
            tokens = attention_mask.sum()
        else:
            tokens = torch.tensor(inputs["input_ids"].numel(), device=labels.device)
        self._add(mode, "_num_tokens", tokens.float(), torch.ones((), device=tokens.device))

        if return_outputs:
            with torch.no_grad():
                outputs = model(**forward_inputs, use_cache=False)
            return total, outputs
        return total

    # ---- logging -----------------------------------------------------------------------------------------------
    def _add(self, mode: str, key: str, value: torch.Tensor, count: torch.Tensor) -> None:
        sums, counts = self._term_sums[mode], self._term_counts[mode]
        sums[key] = sums[key] + value if key in sums else value.clone()
        counts[key] = counts[key] + count if key in counts else count.clone()

    def _record(self, mode: str, logs: dict[str, tuple[torch.Tensor, torch.Tensor]], prefix: str) -> None:
        # each term is a (value, weight) pair: the logged mean of a window is sum(value) / sum(weight)
        for name, (value, weight) in logs.items():
            self._add(mode, prefix + name, value, weight.to(value.device))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        sums, counts = self._term_sums[mode], self._term_counts[mode]
        if sums:
            keys = sorted(sums)
            device = sums[keys[0]].device
            packed = torch.stack(
                [torch.stack([sums[k].to(device).float() for k in keys]), torch.stack([counts[k].to(device).float() for k in keys])]
            )
            packed = self.accelerator.reduce(packed, reduction="sum")
            means = {}
            for key, total, count in zip(keys, packed[0].tolist(), packed[1].tolist()):
                if key == "_num_tokens":
                    self._total_train_tokens += int(total) if mode == "train" else 0
                    continue
                means[key] = total / max(count, 1.0)
            prefix = "eval_" if mode == "eval" else ""
            logs.update({prefix + key: value for key, value in means.items()})
            sums.clear()
            counts.clear()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if mode == "train" and self.args.nonfinite_loss == "skip":
            logs["nonfinite_skipped"] = self.nonfinite_skipped
        super().log(logs, start_time)


__all__ += ["check_batch_split", "check_dataset_columns", "depth_labels", "unused_parameter_reasons"]

# Public names that moved to `trainers.teacher` (issue 10): importing them from here still works, with a warning.
_MOVED_TO_TEACHER = ("fit_bnb_4bit_cpu_layers", "teacher_quantization_config")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_TEACHER:
        import warnings

        from . import teacher

        warnings.warn(
            f"trainers.distillation_trainer.{name} moved to trainers.teacher.{name} (also `from trainers import "
            f"{name}`); the old import path will be removed in a future release.",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(teacher, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

