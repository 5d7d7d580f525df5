"""Non-finite steps of `SlimDistillationTrainer`: before each `optimizer.step()`, every loss term of the step's
micro-batches and the gradients are checked on every process; a NaN/inf stops training with [`NonFiniteLossError`]
(`nonfinite_loss="error"`) or drops the step (`"skip"`)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from transformers import Trainer, TrainerCallback
from transformers.utils import logging


__all__ = ["GRADIENTS", "NonFiniteGuard", "NonFiniteLossError"]

# the trainer's records, under the logger name they had before the guard got a module of its own
logger = logging.get_logger("trainers.distillation_trainer")

GRADIENTS = "gradients"  # the entry of the check that is not a loss term


class NonFiniteLossError(FloatingPointError):
    """A loss term or the gradients of an optimizer step are NaN/inf (`nonfinite_loss="error"`).

    Raised by [`SlimDistillationTrainer`] just before `optimizer.step()`, on every process at the same step, so the
    student still holds the weights (and the optimizer the state) of the last good step. A `FloatingPointError`, the
    standard type for a floating-point result that is not a number, so it can be caught without importing this
    module.

    Attributes:
        step (`int`): `state.global_step` when raised, i.e. the number of optimizer steps already applied.
        terms (`dict[str, str]`): Each non-finite logged term (`lm`, `kd`, `mtp_lm_{k}`, `mtp_kd_{k}`, `aux`,
            `total`, or `gradients`) -> `"nan"` or `"inf"`, over every micro-batch and process of the step.
    """

    def __init__(self, message: str, step: int, terms: dict[str, str]):
        super().__init__(message)
        self.step = step
        self.terms = dict(terms)

    def __reduce__(self):  # keep step and terms through pickling (multiprocessing, elastic agents)
        return type(self), (str(self), self.step, self.terms)


class NonFiniteGuard(TrainerCallback):
    """The trainer's non-finite check, run at `on_pre_optimizer_step`: the Trainer fires it after the backward passes
    (and gradient clipping) of an accumulation window and right before `optimizer.step()`, on every process — the
    last point where a bad step can still be stopped or dropped without touching the weights.

    Args:
        trainer (`transformers.Trainer`): The trainer whose steps are checked (held weakly: the trainer owns its
            callbacks, so no reference cycle).
        terms (`Sequence[str]`): Every loss term [`~NonFiniteGuard.flag`] may be given, the same on every process
            (the per-step flags are reduced over processes as one tensor).

    Attributes:
        skipped (`int`): Optimizer steps skipped (`nonfinite_loss="skip"`) since `train()` started.
    """

    def __init__(self, trainer: Trainer, terms: Sequence[str]):
        self._trainer = weakref.ref(trainer)
        self._device = trainer.args.device
        self.names = [*terms, GRADIENTS]
        self.window: torch.Tensor | None = None  # [2 (nan, inf), len(names)] counts of the accumulation window
        self.skipped = 0
        if trainer.is_deepspeed_enabled:
            logger.warning(
                "Under DeepSpeed the engine steps the optimizer inside backward, before the trainer's non-finite "
                "check (nonfinite_loss) runs: a NaN/inf loss still stops training or is counted, but its step is "
                "already applied. Use DeepSpeed's own overflow handling (fp16 loss scaling) to skip steps."
            )

    def on_train_begin(self, args, state, control, **kwargs):
        self.window = None
        self.skipped = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            self._check(trainer)

    def flag(self, values: dict[str, torch.Tensor]) -> None:
        """Count the NaN / inf values among `values` (scalar terms of one micro-batch) into the window's flags.

        Device ops only: the one host sync per optimizer step is in the check before `optimizer.step()`."""
        device = self._device
        if self.window is None:
            self.window = torch.zeros(2, len(self.names), device=device)
        zero = torch.zeros((), device=device)
        stacked = torch.stack([values[n].detach().float().to(device) if n in values else zero for n in self.names])
        self.window += torch.stack([stacked.isnan(), stacked.isinf()])

    @staticmethod
    def _gradient_max_abs(trainer: Trainer) -> torch.Tensor | None:
        """The largest |gradient| over the student's parameters on this process: NaN when any gradient is NaN, inf
        when one is inf; `None` where gradients are not checked.

        The max-abs norm, unlike the L2 norm the Trainer clips with, cannot overflow for finite fp16/bf16 gradients,
        so it is finite exactly when every gradient is. One read of the gradients, like the Trainer's own grad norm.
        Not checked with a loss-scaling `GradScaler` (fp16): its inf gradients are expected and it skips those steps
        itself; nor under DeepSpeed, whose gradients are not in `param.grad`."""
        if trainer.is_deepspeed_enabled or getattr(trainer.accelerator, "scaler", None) is not None:
            return None
        # a DTensor (FSDP2) gradient is checked by its local shard; the flag is reduced over processes afterwards.
        # A shard can be empty (a tensor with fewer rows than processes), and an empty tensor has no inf-norm.
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        grads = [g for g in grads if g.numel()]
        if not grads:
            return None
        return torch.nn.utils.get_total_norm(grads, norm_type=float("inf"), error_if_nonfinite=False)

    def _check(self, trainer: Trainer) -> None:
        """Stop (`nonfinite_loss="error"`) or skip (`"skip"`) the coming optimizer step when a loss term of its
        micro-batches or a gradient is NaN/inf on any process."""
        names = self.names
        device = trainer.args.device
        flags = self.window
        self.window = None
        if flags is None:
            flags = torch.zeros(2, len(names), device=device)
        grad = self._gradient_max_abs(trainer)
        if grad is not None:
            grad = grad.float().to(device)
            flags[0, -1] += grad.isnan().float()
            flags[1, -1] += grad.isinf().float()
        if trainer.accelerator.num_processes > 1:
            # Every process must take the same decision: one that steps while another stops would hang in the next
            # collective, and one that skips while another steps would make the DDP replicas diverge.
            flags = trainer.accelerator.reduce(flags, reduction="sum")
        nan, inf = flags.gt(0).tolist()  # the one host sync of the check
        terms = {name: "nan" if n else "inf" for name, n, i in zip(names, nan, inf) if n or i}
        if not terms:
            return
        step = int(trainer.state.global_step)
        losses = ", ".join(f"{name}={kind}" for name, kind in terms.items() if name != GRADIENTS)
        parts = [f"non-finite loss terms {losses}"] if losses else []
        if GRADIENTS in terms:
            note = "" if losses else "; every loss term is finite"
            parts.append(f"non-finite gradients ({terms[GRADIENTS]}{note})")
        processes = trainer.accelerator.num_processes
        where = (
            f"global step {step} ({trainer.current_gradient_accumulation_steps} micro-batch(es) accumulated for "
            f"optimizer step {step + 1}{f', over {processes} processes' if processes > 1 else ''})"
        )
        what = " and ".join(parts)
        if trainer.args.nonfinite_loss == "skip":
            # Parameters without a gradient are left alone by the optimizer (weights, moments and step count, as in
            # every torch.optim and bitsandbytes optimizer); the Trainer zeroes the grads after the step anyway.
            trainer.model.zero_grad(set_to_none=True)
            self.skipped += 1
            logger.warning(
                f"SlimDistillationTrainer: {what} at {where}: skipped this optimizer step (nonfinite_loss='skip'); "
                f"{self.skipped} step(s) skipped so far. The LR and λ/β schedules still advance."
            )
            return
        raise NonFiniteLossError(
            f"SlimDistillationTrainer: {what} at {where}. Stopped before optimizer.step(): the student keeps the "
            f"weights of global step {step}. Usual causes: a NaN/inf weight in the teacher or the student (check "
            "`all(p.isfinite().all() for p in model.parameters())`), a too high learning rate, or fp16 overflow. Set "
            "nonfinite_loss='skip' to skip such steps instead.",
            step=step,
            terms=terms,
        )
