"""Loss terms for distilling a pruned MoE student from its teacher (SlimQwen recipe), as pure functions.

The SlimQwen objective is

    L = (1 - λ) · L_LM + λ · L_KD + β · ((1 - λ) · L_MTP-LM + λ · L_MTP-KD)

with λ decaying linearly 1.0 -> 0.75 and β following a cosine 0.3 -> 0.1 (see [`LossWeightSchedule`]).
[`slimqwen_objective`] weighs given terms; [`distillation_objective`] computes every term of one student forward from
hidden states and returns the loss with the per-term logs (what `SlimDistillationTrainer.compute_loss` calls).

Every term that needs vocabulary-sized logits ([`chunked_kd_loss`], [`mtp_kd_loss`], [`lm_loss`],
[`mtp_lm_loss`]) takes hidden states and the `lm_head` weight instead of logits and projects a chunk of tokens at
a time, so `[tokens, vocab]` logits never exist in full for the student or the teacher. The gradient with respect to
the student's hidden states, head weight and head bias is computed chunk by chunk inside the forward pass (the
student's and the teacher's `[chunk, vocab]` logits are the only vocabulary-sized buffers; softmaxes and gradients
are computed in place in them) and only scaled in the backward pass. [`distillation_objective`] computes every term
of every depth in one such pass over the shared head, with one float32 head-gradient buffer for the whole objective;
see `docs/kd_memory.md` for the measured memory and time against the naive full-logit loss.

Conventions shared by every term:

- Divergences are those of TRL's `generalized_jsd_loss`: `forward_kl` is KL(teacher || student), `reverse_kl` is
  KL(student || teacher), and `jsd` with `jsd_beta` is the generalized JSD with mixture
  `m = (1 - jsd_beta) · p_student + jsd_beta · p_teacher`, where `jsd_beta = 0` / `1` give forward / reverse KL.
- KD losses are scaled by `temperature ** 2` (Hinton et al.; Minitron), so gradient magnitudes do not shrink as the
  temperature grows.
- Reduction: the sum over counted tokens divided by `num_items_in_batch` when it is given (gradient-accumulation
  correct, as in transformers and TRL), else by the number of counted tokens (`reduction="mean"`), or not divided
  (`reduction="sum"`).

One concern per module: `options` (validation), `chunked` (the chunked head loss and its autograd function), `kd`,
`lm` and `mtp` (the terms), `objective` (weighing and composing them) and `schedules` (λ and β).
"""

from .kd import TeacherTopK, chunked_kd_loss
from .lm import lm_loss
from .mtp import align_mtp_positions, mtp_kd_loss, mtp_lm_loss
from .objective import distillation_objective, slimqwen_objective
from .options import DEFAULT_CHUNK_SIZE as DEFAULT_CHUNK_SIZE  # importable as before, not in __all__
from .options import DIVERGENCES, check_kd_options
from .options import REDUCTIONS as REDUCTIONS  # importable as before, not in __all__
from .schedules import SCHEDULE_KINDS, LossWeightSchedule, cosine_schedule, linear_schedule


__all__ = [
    "DIVERGENCES", "SCHEDULE_KINDS", "LossWeightSchedule", "TeacherTopK", "align_mtp_positions", "check_kd_options",
    "chunked_kd_loss", "cosine_schedule", "distillation_objective", "linear_schedule", "lm_loss", "mtp_kd_loss",
    "mtp_lm_loss", "slimqwen_objective",
]  # fmt: skip
