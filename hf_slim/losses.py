"""Loss terms for distilling a pruned MoE student from its teacher (SlimQwen recipe), as pure functions.

The SlimQwen objective is

    L = (1 - λ) · L_LM + λ · L_KD + β · ((1 - λ) · L_MTP-LM + λ · L_MTP-KD)

with λ decaying linearly 1.0 -> 0.75 and β following a cosine 0.3 -> 0.1 (see [`LossWeightSchedule`]).
[`slimqwen_objective`] weighs given terms; [`distillation_objective`] computes every term of one student forward from
hidden states and returns the loss with the per-term logs (what `SlimDistillationTrainer.compute_loss` calls).

Every term that needs vocabulary-sized logits ([`chunked_kd_loss`], [`mtp_kd_loss`], [`lm_loss`],
[`mtp_lm_loss`]) takes hidden states and the `lm_head` weight instead of logits and projects a chunk of tokens at
a time, so `[tokens, vocab]` logits never exist in full for the student or the teacher. The gradient with respect to
the student's hidden states, head weight and head bias is computed chunk by chunk inside the forward pass (one
`[chunk, vocab]` buffer alive at a time) and only scaled in the backward pass; see `docs/kd_memory.md` for the
measured memory and time against the naive full-logit loss.

Conventions shared by every term:

- Divergences are those of TRL's `generalized_jsd_loss`: `forward_kl` is KL(teacher || student), `reverse_kl` is
  KL(student || teacher), and `jsd` with `jsd_beta` is the generalized JSD with mixture
  `m = (1 - jsd_beta) · p_student + jsd_beta · p_teacher`, where `jsd_beta = 0` / `1` give forward / reverse KL.
- KD losses are scaled by `temperature ** 2` (Hinton et al.; Minitron), so gradient magnitudes do not shrink as the
  temperature grows.
- Reduction: the sum over counted tokens divided by `num_items_in_batch` when it is given (gradient-accumulation
  correct, as in transformers and TRL), else by the number of counted tokens (`reduction="mean"`), or not divided
  (`reduction="sum"`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


__all__ = [
    "DIVERGENCES",
    "SCHEDULE_KINDS",
    "LossWeightSchedule",
    "align_mtp_positions",
    "check_kd_options",
    "chunked_kd_loss",
    "cosine_schedule",
    "distillation_objective",
    "linear_schedule",
    "lm_loss",
    "mtp_kd_loss",
    "mtp_lm_loss",
    "slimqwen_objective",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum")
SCHEDULE_KINDS = ("linear", "cosine", "constant")
DEFAULT_CHUNK_SIZE = 256

# A chunk's loss function: (first row, end row, a thunk returning the chunk's float32/64 student logits [rows, vocab],
# whether the gradient is wanted) -> (summed loss of the chunk, gradient of that sum wrt the logits or None). The thunk
# hands the only reference to the logits to the loss function, so it can free them as soon as it has used them.
_ChunkLossFn = Callable[[int, int, Callable[[], torch.Tensor], bool], tuple[torch.Tensor, torch.Tensor | None]]


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _check_chunk_size(chunk_size: int, name: str = "chunk_size") -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name} must be a positive int (tokens per chunk), got {chunk_size!r}.")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def _check_num_items(num_items_in_batch: int | torch.Tensor | None) -> None:
    if num_items_in_batch is None or isinstance(num_items_in_batch, torch.Tensor):
        return
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise ValueError(
            f"num_items_in_batch must be None, a number or a tensor, got {type(num_items_in_batch).__name__}."
        )
    if not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch must be > 0 (the number of counted tokens), got {num_items_in_batch!r}.")


def check_kd_options(
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    teacher_top_k: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    chunk_size_name: str = "chunk_size",
) -> None:
    """Raise a `ValueError` naming the option and its value for KD settings no loss here accepts.

    The losses check their arguments with it, and `SlimDistillationConfig` checks its fields with it when it is built.

    Args:
        divergence, temperature, jsd_beta, teacher_top_k, chunk_size: As in [`chunked_kd_loss`].
        chunk_size_name (`str`, *optional*, defaults to `"chunk_size"`): How the message names `chunk_size` (e.g.
            `"kd_chunk_size"` for a config field).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}.")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or not temperature > 0
    ):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}.")
    if isinstance(jsd_beta, bool) or not isinstance(jsd_beta, (int, float)) or not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must be a number in [0, 1] (0 = forward KL, 1 = reverse KL), got {jsd_beta!r}.")
    if teacher_top_k is not None:
        if isinstance(teacher_top_k, bool) or not isinstance(teacher_top_k, int) or teacher_top_k < 1:
            raise ValueError(f"teacher_top_k must be None or a positive int, got {teacher_top_k!r}.")
        if divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1.0):
            raise ValueError(
                f"teacher_top_k={teacher_top_k} cannot be used with divergence={divergence!r}"
                + (f" and jsd_beta={jsd_beta}" if divergence == "jsd" else "")
                + ": the top-k teacher is zero outside its top k tokens, so KL(student || teacher) is infinite. "
                "Use divergence='forward_kl', or 'jsd' with jsd_beta < 1, or teacher_top_k=None."
            )
    _check_chunk_size(chunk_size, chunk_size_name)


def _check_head(name_hidden: str, hidden: torch.Tensor, name_weight: str, weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{name_weight} must be 2-D [vocab, hidden], got shape {tuple(weight.shape)}.")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name_hidden} has hidden size {hidden.shape[-1] if hidden.dim() else None} (shape {tuple(hidden.shape)}) "
            f"but {name_weight} expects {weight.shape[1]} (shape {tuple(weight.shape)})."
        )


def _check_bias(name: str, bias: torch.Tensor | None, weight: torch.Tensor) -> None:
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}.")


def _check_vocab(student_head_weight: torch.Tensor, teacher_head_weight: torch.Tensor) -> None:
    v_s, v_t = student_head_weight.shape[0], teacher_head_weight.shape[0]
    if v_s != v_t:
        raise ValueError(
            f"Vocabulary mismatch: student_head_weight has {v_s} rows but teacher_head_weight has {v_t}. KD compares "
            "distributions token by token, so both heads must cover the same vocabulary. If the models share a "
            "tokenizer and only the padded head rows differ (e.g. 151936 vs 152064), pass both heads sliced to the "
            "tokenizer length (`weight[:len(tokenizer)]`); otherwise use a teacher with the student's tokenizer."
        )


def _check_progress(progress: float) -> float:
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be a number in [0, 1] (fraction of training done), got {progress!r}.")
    return float(progress)


# ----------------------------------------------------------------------------------------------------------------
# Chunked projection + loss, gradient computed in the forward pass
# ----------------------------------------------------------------------------------------------------------------


def _loss_dtype(weight: torch.Tensor) -> torch.dtype:
    """Float32, or float64 for float64 heads (so float64 references can be matched tightly)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Logits `[rows, vocab]` of a chunk of hidden states, computed in the head's dtype like the model does, then
    upcast to at least float32 for the softmax."""
    hidden = hidden.to(weight.dtype)
    logits = torch.mm(hidden, weight.t()) if bias is None else torch.addmm(bias.to(weight.dtype), hidden, weight.t())
    return logits.to(_loss_dtype(weight))


class _ChunkedHeadLoss(torch.autograd.Function):
    """Scalar `scale · Σ_chunks chunk_loss(hidden[chunk] @ weight.T + bias)` without keeping `[rows, vocab]` alive.

    In the default mode the gradients wrt `hidden`, `weight` and `bias` are accumulated chunk by chunk during the
    forward pass and only multiplied by the incoming gradient in `backward` (no second projection of either model).
    With `recompute=True` the forward keeps nothing but its inputs and the backward projects every chunk again:
    less memory held between forward and backward (no `[vocab, hidden]` gradient buffer), about 1.5x the matmuls.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        chunk_loss: _ChunkLossFn,
        chunk_size: int,
        scale: torch.Tensor,
        recompute: bool,
    ) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        ctx.chunk_loss, ctx.chunk_size, ctx.recompute = chunk_loss, chunk_size, recompute
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.acc_dtype = _loss_dtype(weight)
        wants = tuple(ctx.needs_input_grad[:3])
        if recompute or not any(wants):
            total = _ChunkedHeadLoss._run(hidden, weight, bias, chunk_loss, chunk_size, None, (False,) * 3)[0]
            ctx.save_for_backward(hidden, weight, bias, scale)
            return total * scale
        total, grads = _ChunkedHeadLoss._run(hidden, weight, bias, chunk_loss, chunk_size, scale, wants)
        ctx.save_for_backward(*grads)
        return total * scale

    @staticmethod
    def _run(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        chunk_loss: _ChunkLossFn,
        chunk_size: int,
        scale: torch.Tensor | None,
        wants: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
        want_h, want_w, want_b = wants
        want_any = want_h or want_w or want_b
        n = hidden.shape[0]
        acc = _loss_dtype(weight)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        # Gradients accumulate in float32 (float64 for float64 heads) whatever the parameter dtype.
        grad_h = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_b else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end]
            loss, grad_logits = chunk_loss(start, end, lambda h=h: _project(h, weight, bias), want_any)
            total += loss
            if not want_any:
                continue
            grad_logits.mul_(scale)
            if grad_h is not None:
                if weight.dtype == acc:
                    torch.mm(grad_logits, weight, out=grad_h[start:end])
                else:
                    grad_h[start:end] = torch.mm(grad_logits.to(weight.dtype), weight)
            if grad_w is not None:
                grad_w.addmm_(grad_logits.t(), h.to(acc))
            if grad_b is not None:
                grad_b += grad_logits.sum(0)
            del grad_logits
        return total, (grad_h, grad_w, grad_b)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None):  # type: ignore[override]
        if grad_out is None:
            return (None,) * 7
        if ctx.recompute:
            hidden, weight, bias, scale = ctx.saved_tensors
            wants = tuple(ctx.needs_input_grad[:3])
            _, (grad_h, grad_w, grad_b) = _ChunkedHeadLoss._run(
                hidden, weight, bias, ctx.chunk_loss, ctx.chunk_size, scale * grad_out.to(scale.dtype), wants
            )
        else:
            grad_h, grad_w, grad_b = ctx.saved_tensors
            g = grad_out.to(ctx.acc_dtype)
            # In place: a second backward through the same graph then fails loudly on the version check instead of
            # needing a second [V, H] buffer here.
            for grad in (grad_h, grad_w, grad_b):
                if grad is not None:
                    grad.mul_(g)
        out = tuple(None if t is None else t.to(d) for t, d in zip((grad_h, grad_w, grad_b), ctx.dtypes))
        return (*out, None, None, None, None)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product `(a * b).sum(-1)` of two `[rows, vocab]` tensors without a `[rows, vocab]` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _kd_chunk_loss(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    divergence: str,
    temperature: float,
    jsd_beta: float,
    teacher_top_k: int | None,
) -> _ChunkLossFn:
    """Chunk loss of a divergence between the student chunk and the teacher's distribution at the same rows."""
    # TRL's convention: the generalized JSD at beta 0 / 1 is the forward / reverse KL.
    if divergence == "jsd" and jsd_beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and jsd_beta == 1.0:
        divergence = "reverse_kl"
    inv_t = 1.0 / temperature
    # The T² factor is in the caller's scale; here only the chain rule through logits / T.
    grad_factor = inv_t

    def chunk_loss(start: int, end: int, student_logits: Callable[[], torch.Tensor], want_grad: bool):
        with torch.no_grad():
            s_logits = student_logits()
            t_logits = _project(teacher_hidden[start:end], teacher_weight, teacher_bias)
            if inv_t != 1.0:
                t_logits.mul_(inv_t)
                s_logits.mul_(inv_t)
            # log_softmax is faster than logsumexp + in-place subtraction on CPU and peaks at the same memory
            log_ps = torch.log_softmax(s_logits, dim=-1)
            del s_logits
            if teacher_top_k is not None:
                top_vals, top_idx = t_logits.topk(min(teacher_top_k, t_logits.shape[-1]), dim=-1, sorted=False)
                del t_logits
                log_qk = torch.log_softmax(top_vals, dim=-1)
                qk = log_qk.exp()
                if divergence == "forward_kl":
                    loss_rows = (qk * (log_qk - log_ps.gather(1, top_idx))).sum(-1)
                    grad = log_ps.exp_().scatter_add_(1, top_idx, -qk) if want_grad else None
                else:  # jsd with 0 < beta < 1; the teacher is zero outside its top k, so log m = log((1 - b) p_s) there
                    log_m = log_ps + math.log1p(-jsd_beta)
                    log_m.scatter_(1, top_idx, torch.logaddexp(log_m.gather(1, top_idx), log_qk + math.log(jsd_beta)))
                    kl_t = (qk * (log_qk - log_m.gather(1, top_idx))).sum(-1)
                    ps = log_ps.exp()
                    diff = log_ps.sub_(log_m)
                    del log_m
                    kl_s = _row_dot(ps, diff)
                    loss_rows = jsd_beta * kl_t + (1.0 - jsd_beta) * kl_s
                    grad = diff.sub_(kl_s.unsqueeze(1)).mul_(ps).mul_(1.0 - jsd_beta) if want_grad else None
            else:
                log_pt = torch.log_softmax(t_logits, dim=-1)
                del t_logits
                if divergence == "forward_kl":
                    pt = log_pt.exp()
                    loss_rows = _row_dot(pt, log_pt) - _row_dot(pt, log_ps)
                    del log_pt
                    grad = log_ps.exp_().sub_(pt) if want_grad else None
                elif divergence == "reverse_kl":
                    ps = log_ps.exp()
                    diff = log_pt.neg_().add_(log_ps)
                    loss_rows = _row_dot(ps, diff)
                    grad = diff.sub_(loss_rows.unsqueeze(1)).mul_(ps) if want_grad else None
                else:  # jsd, 0 < beta < 1
                    log_m = log_ps + math.log1p(-jsd_beta)
                    torch.logaddexp(log_m, log_pt + math.log(jsd_beta), out=log_m)
                    pt = log_pt.exp()
                    kl_t = _row_dot(pt, log_pt.sub_(log_m))
                    del pt, log_pt
                    ps = log_ps.exp()
                    diff = log_ps.sub_(log_m)
                    del log_m
                    kl_s = _row_dot(ps, diff)
                    loss_rows = jsd_beta * kl_t + (1.0 - jsd_beta) * kl_s
                    grad = diff.sub_(kl_s.unsqueeze(1)).mul_(ps).mul_(1.0 - jsd_beta) if want_grad else None
            if grad is not None and grad_factor != 1.0:
                grad.mul_(grad_factor)
            return loss_rows.sum(), grad

    return chunk_loss


def _ce_chunk_loss(targets: torch.Tensor) -> _ChunkLossFn:
    """Chunk loss of the cross-entropy of the student chunk against hard targets (one per row, all counted)."""

    def chunk_loss(start: int, end: int, student_logits: Callable[[], torch.Tensor], want_grad: bool):
        with torch.no_grad():
            tgt = targets[start:end].unsqueeze(1)
            log_p = torch.log_softmax(student_logits(), dim=-1)
            loss = -log_p.gather(1, tgt).sum()
            if not want_grad:
                return loss, None
            grad = log_p.exp_()
            grad.scatter_add_(1, tgt, torch.full_like(tgt, -1.0, dtype=grad.dtype))
            return loss, grad

    return chunk_loss


def _scale(
    n_counted: torch.Tensor,
    factor: float,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch).to(device=device, dtype=dtype)
    elif reduction == "mean":
        denom = n_counted.to(device=device, dtype=dtype).clamp_min(1.0)
    else:
        denom = torch.ones((), dtype=dtype, device=device)
    return factor / denom


def _counted_mask(
    leading_shape: torch.Size,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ignore_index: int,
    device: torch.device,
) -> torch.Tensor | None:
    counted = None
    for name, value in (("mask", mask), ("labels", labels)):
        if value is None:
            continue
        if tuple(value.shape) != tuple(leading_shape):
            raise ValueError(
                f"{name} must have the hidden states' leading shape {tuple(leading_shape)}, got {tuple(value.shape)}."
            )
        m = (value != ignore_index) if name == "labels" else value.bool()
        counted = m if counted is None else counted & m
    return None if counted is None else counted.reshape(-1).to(device)


# ----------------------------------------------------------------------------------------------------------------
# Public loss terms
# ----------------------------------------------------------------------------------------------------------------


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    teacher_top_k: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """Knowledge-distillation divergence computed from hidden states and `lm_head` weights, a chunk of tokens at a time.

    Row `i` of `student_hidden` is compared with row `i` of `teacher_hidden` (the positions are already aligned; use
    [`mtp_kd_loss`] to align by next-token / MTP depth). Logits are projected for `chunk_size` tokens at a time, the
    teacher's under `torch.no_grad()`, and the gradient wrt the student's hidden states, head weight and bias is
    accumulated chunk by chunk, so neither model's `[tokens, vocab]` logits are ever materialized.

    The returned `forward_kl` is the KL divergence KL(teacher || student), i.e. the cross-entropy against the
    teacher's soft targets used by SlimQwen minus the teacher's entropy: the same gradient, zero when the student
    matches the teacher.

    Args:
        student_hidden (`torch.Tensor`):
            Student hidden states before the head, shape `[..., H_s]` (e.g. `[N, H_s]` or `[B, T, H_s]`).
        student_head_weight (`torch.Tensor`):
            Student `lm_head` weight `[V, H_s]`. Receives a gradient when it requires one.
        teacher_hidden (`torch.Tensor`):
            Teacher hidden states `[..., H_t]` with the same leading shape as `student_hidden`. Never receives a gradient.
        teacher_head_weight (`torch.Tensor`):
            Teacher `lm_head` weight `[V, H_t]`; the vocabulary `V` must equal the student's.
        mask (`torch.Tensor`, *optional*):
            Bool/0-1 tensor with the leading shape of the hidden states; only nonzero positions are counted.
        labels (`torch.Tensor`, *optional*):
            Labels aligned with the hidden states (already shifted); positions equal to `ignore_index` are not counted.
            Combined with `mask` when both are given.
        ignore_index (`int`, *optional*, defaults to -100):
            Label value that marks positions to skip.
        temperature (`float`, *optional*, defaults to 1.0):
            Softmax temperature applied to both models' logits; the loss is multiplied by `temperature ** 2`.
        divergence (`str`, *optional*, defaults to `"forward_kl"`):
            `"forward_kl"` (KL(teacher || student)), `"reverse_kl"` (KL(student || teacher)) or `"jsd"`.
        jsd_beta (`float`, *optional*, defaults to 0.5):
            For `"jsd"`: weight of the teacher in the mixture `(1 - jsd_beta) · p_student + jsd_beta · p_teacher`,
            in [0, 1]; 0 gives the forward KL and 1 the reverse KL (TRL's `generalized_jsd_loss` convention).
        teacher_top_k (`int`, *optional*):
            Keep only the teacher's `k` most likely tokens per position, renormalised over those `k`. The teacher's
            mass outside the top `k` is dropped (its target is exactly zero there), so the student is pulled to put
            all of its mass on the teacher's top `k`. Not allowed with reverse KL, which is infinite against a
            target with zeros.
        chunk_size (`int`, *optional*, defaults to 256):
            Tokens per chunk; peak extra memory is a few `[chunk_size, V]` float32 buffers.
        student_head_bias (`torch.Tensor`, *optional*):
            Student head bias `[V]`.
        teacher_head_bias (`torch.Tensor`, *optional*):
            Teacher head bias `[V]`.
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` over counted tokens or `"sum"`; ignored when `num_items_in_batch` is given.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Divide the summed loss by this count instead (gradient-accumulation-correct normalisation).
        recompute (`bool`, *optional*, defaults to `False`):
            Project every chunk again in the backward pass instead of computing the gradient during the forward.
            Holds no `[V, H_s]` gradient buffer between forward and backward, at about 1.5x the matmul time.

    Returns:
        `torch.Tensor`: scalar loss (float32; float64 when the head is float64).
    """
    check_kd_options(divergence, temperature, jsd_beta, teacher_top_k, chunk_size)
    _check_reduction(reduction)
    _check_num_items(num_items_in_batch)
    _check_head("student_hidden", student_hidden, "student_head_weight", student_head_weight)
    _check_head("teacher_hidden", teacher_hidden, "teacher_head_weight", teacher_head_weight)
    _check_vocab(student_head_weight, teacher_head_weight)
    _check_bias("student_head_bias", student_head_bias, student_head_weight)
    _check_bias("teacher_head_bias", teacher_head_bias, teacher_head_weight)
    leading = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != leading:
        raise ValueError(
            f"teacher_hidden must have the same leading shape as student_hidden {tuple(leading)}, "
            f"got {tuple(teacher_hidden.shape[:-1])}."
        )
    if teacher_top_k is not None and teacher_top_k > teacher_head_weight.shape[0]:
        raise ValueError(
            f"teacher_top_k must be <= the vocabulary size {teacher_head_weight.shape[0]}, got {teacher_top_k}."
        )
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    counted = _counted_mask(leading, mask, labels, ignore_index, h_s.device)
    if counted is not None:
        h_s, h_t = h_s[counted], h_t[counted.to(h_t.device)]
    n_counted = torch.tensor(h_s.shape[0], device=h_s.device)
    scale = _scale(
        n_counted, float(temperature) ** 2, reduction, num_items_in_batch, h_s.device, _loss_dtype(student_head_weight)
    )
    chunk_loss = _kd_chunk_loss(
        h_t,
        teacher_head_weight.detach(),
        None if teacher_head_bias is None else teacher_head_bias.detach(),
        divergence,
        float(temperature),
        float(jsd_beta),
        teacher_top_k,
    )
    return _ChunkedHeadLoss.apply(
        h_s, student_head_weight, student_head_bias, chunk_loss, chunk_size, scale, recompute
    )


def align_mtp_positions(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    depth: int,
    *,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    teacher_depth: int = 0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair student positions of MTP depth `depth` with the teacher positions that predict the same future token.

    The main head (depth 0) at position `i` predicts token `i + 1`; MTP depth `k` at position `i` predicts token
    `i + 1 + k`. The teacher's head of depth `teacher_depth` (0 = its main head) predicts that token at position
    `i + k - teacher_depth`. Positions whose target token lies past the sequence are dropped; a kept position is
    counted when its target label is not `ignore_index` and the student position, the teacher position and the
    target token are all real tokens under `attention_mask`.

    Args:
        student_hidden (`torch.Tensor`): Student hidden states of depth `depth`, `[B, T, H_s]`.
        teacher_hidden (`torch.Tensor`): Teacher hidden states of depth `teacher_depth`, `[B, T, H_t]`.
        depth (`int`): Student depth `k >= 0` (0 = main head).
        labels (`torch.Tensor`, *optional*): Unshifted labels `[B, T]` (HF convention: the input ids, `ignore_index`
            where no loss is wanted).
        attention_mask (`torch.Tensor`, *optional*): `[B, T]`, 1 for real tokens and 0 for padding.
        teacher_depth (`int`, *optional*, defaults to 0): Depth of the teacher head that produced `teacher_hidden`,
            `0 <= teacher_depth <= depth`.
        ignore_index (`int`, *optional*, defaults to -100): Label value to skip.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: student rows `[B, T - 1 - depth, H_s]`, the aligned teacher
        rows `[B, T - 1 - depth, H_t]`, and the bool mask `[B, T - 1 - depth]` of counted positions.
    """
    for name, value in (("depth", depth), ("teacher_depth", teacher_depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
    if teacher_depth > depth:
        raise ValueError(
            f"teacher_depth must be <= depth ({depth}) so the teacher position i + depth - teacher_depth is not in "
            f"the past of the student's, got {teacher_depth}."
        )
    if student_hidden.dim() != 3 or teacher_hidden.dim() != 3:
        raise ValueError(
            "student_hidden and teacher_hidden must be [batch, seq, hidden], got shapes "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}."
        )
    b, t = student_hidden.shape[:2]
    if teacher_hidden.shape[:2] != (b, t):
        raise ValueError(
            f"teacher_hidden must have the student's [batch, seq] = {(b, t)}, got {tuple(teacher_hidden.shape[:2])}."
        )
    for name, value in (("labels", labels), ("attention_mask", attention_mask)):
        if value is not None and tuple(value.shape) != (b, t):
            raise ValueError(f"{name} must have shape [batch, seq] = {(b, t)}, got {tuple(value.shape)}.")
    n = max(t - 1 - depth, 0)
    offset = depth - teacher_depth
    student_rows = student_hidden[:, :n]
    teacher_rows = teacher_hidden[:, offset : offset + n]
    counted = torch.ones((b, n), dtype=torch.bool, device=student_hidden.device)
    if labels is not None:
        counted &= labels[:, 1 + depth : 1 + depth + n].to(counted.device) != ignore_index
    if attention_mask is not None:
        am = attention_mask.to(counted.device).bool()
        counted &= am[:, :n] & am[:, offset : offset + n] & am[:, 1 + depth : 1 + depth + n]
    return student_rows, teacher_rows, counted


def mtp_kd_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    depth: int,
    *,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    teacher_depth: int = 0,
    ignore_index: int = -100,
    **kd_kwargs,
) -> torch.Tensor:
    """KD of the student's depth-`depth` head against the teacher's distribution for the same future token.

    For MTP depth `k >= 1`, the student's MTP hidden state at position `i` (which predicts token `i + 1 + k`) is
    distilled from the teacher's main head at position `i + k` (SlimQwen's MTP-KD target), or from the teacher's own
    depth-`teacher_depth` head at position `i + k - teacher_depth`. `depth=0` is the ordinary next-token KD of the
    main head with HF label shifting. Alignment and masking are those of [`align_mtp_positions`]; the loss itself is
    [`chunked_kd_loss`].

    Args:
        student_hidden (`torch.Tensor`): Student hidden states of depth `depth` (after the MTP block's final norm),
            `[B, T, H_s]`.
        student_head_weight (`torch.Tensor`): Student output head `[V, H_s]` (shared with the main model for MTP).
        teacher_hidden (`torch.Tensor`): Teacher hidden states `[B, T, H_t]` (main head unless `teacher_depth > 0`).
        teacher_head_weight (`torch.Tensor`): Teacher `lm_head` weight `[V, H_t]`.
        depth (`int`): Student depth `k >= 0`.
        labels (`torch.Tensor`, *optional*): Unshifted labels `[B, T]`; positions whose target is `ignore_index`
            are not counted.
        attention_mask (`torch.Tensor`, *optional*): `[B, T]` padding mask.
        teacher_depth (`int`, *optional*, defaults to 0): Depth of the teacher head behind `teacher_hidden`.
        ignore_index (`int`, *optional*, defaults to -100): Label value to skip.
        **kd_kwargs: Keyword arguments of [`chunked_kd_loss`] (`temperature`, `divergence`, `jsd_beta`,
            `teacher_top_k`, `chunk_size`, head biases, `reduction`, `num_items_in_batch`, `recompute`).

    Returns:
        `torch.Tensor`: scalar loss (float32; float64 when the head is float64).
    """
    _check_head("student_hidden", student_hidden, "student_head_weight", student_head_weight)
    _check_head("teacher_hidden", teacher_hidden, "teacher_head_weight", teacher_head_weight)
    s_rows, t_rows, counted = align_mtp_positions(
        student_hidden,
        teacher_hidden,
        depth,
        labels=labels,
        attention_mask=attention_mask,
        teacher_depth=teacher_depth,
        ignore_index=ignore_index,
    )
    return chunked_kd_loss(s_rows, student_head_weight, t_rows, teacher_head_weight, counted, **kd_kwargs)


def lm_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    depth: int = 0,
    head_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """Chunked next-token cross-entropy of a head of depth `depth` (labels shifted by `1 + depth`).

    Position `i` of `hidden` is scored against `labels[:, i + 1 + depth]`; positions whose target is `ignore_index`
    (or lies past the sequence) are skipped. Matches `torch.nn.functional.cross_entropy` on the full logits, without
    materializing them.

    Args:
        hidden (`torch.Tensor`): Hidden states `[B, T, H]` before the head.
        head_weight (`torch.Tensor`): Output head weight `[V, H]`.
        labels (`torch.Tensor`): Unshifted labels `[B, T]` (HF convention).
        depth (`int`, *optional*, defaults to 0): 0 for the main head, `k >= 1` for MTP depth `k`.
        head_bias (`torch.Tensor`, *optional*): Head bias `[V]`.
        ignore_index (`int`, *optional*, defaults to -100): Label value to skip.
        chunk_size (`int`, *optional*, defaults to 256): Tokens per chunk.
        reduction (`str`, *optional*, defaults to `"mean"`): `"mean"` over counted tokens or `"sum"`.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): Divide the summed loss by this count instead.
        recompute (`bool`, *optional*, defaults to `False`): See [`chunked_kd_loss`].

    Returns:
        `torch.Tensor`: scalar loss (float32; float64 when the head is float64).
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an int >= 0, got {depth!r}.")
    _check_chunk_size(chunk_size)
    _check_reduction(reduction)
    _check_num_items(num_items_in_batch)
    _check_head("hidden", hidden, "head_weight", head_weight)
    _check_bias("head_bias", head_bias, head_weight)
    if hidden.dim() != 3 or tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"hidden must be [batch, seq, hidden] and labels [batch, seq]; got shapes {tuple(hidden.shape)} and "
            f"{tuple(labels.shape)}."
        )
    t = labels.shape[1]
    n = max(t - 1 - depth, 0)
    rows = hidden[:, :n].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1 + depth : 1 + depth + n].reshape(-1).to(rows.device)
    counted = targets != ignore_index
    rows, targets = rows[counted], targets[counted]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= head_weight.shape[0]):
        raise ValueError(
            f"labels must be token ids in [0, {head_weight.shape[0]}) or ignore_index={ignore_index}, "
            f"got values in [{int(targets.min())}, {int(targets.max())}]."
        )
    n_counted = torch.tensor(rows.shape[0], device=rows.device)
    scale = _scale(n_counted, 1.0, reduction, num_items_in_batch, rows.device, _loss_dtype(head_weight))
    return _ChunkedHeadLoss.apply(rows, head_weight, head_bias, _ce_chunk_loss(targets), chunk_size, scale, recompute)


def mtp_lm_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    depth: int,
    **lm_kwargs,
) -> torch.Tensor:
    """Chunked cross-entropy of MTP depth `depth >= 1`: position `i` predicts `labels[:, i + 1 + depth]`.

    Args:
        hidden (`torch.Tensor`): MTP hidden states of that depth `[B, T, H]`.
        head_weight (`torch.Tensor`): Output head weight `[V, H]` (shared with the main model).
        labels (`torch.Tensor`): Unshifted labels `[B, T]`.
        depth (`int`): MTP depth, `>= 1`.
        **lm_kwargs: Keyword arguments of [`lm_loss`] (`head_bias`, `ignore_index`, `chunk_size`, `reduction`,
            `num_items_in_batch`, `recompute`).

    Returns:
        `torch.Tensor`: scalar loss (float32; float64 when the head is float64).
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1 for an MTP head (use lm_loss for the main head), got {depth!r}.")
    return lm_loss(hidden, head_weight, labels, depth=depth, **lm_kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Objective and weight schedules
# ----------------------------------------------------------------------------------------------------------------


def slimqwen_objective(
    lm: torch.Tensor | None,
    kd: torch.Tensor | None,
    mtp_lm: Sequence[torch.Tensor],
    mtp_kd: Sequence[torch.Tensor],
    lam: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SlimQwen's objective `(1 - λ)·L_LM + λ·L_KD + β·((1 - λ)·L_MTP-LM + λ·L_MTP-KD)`.

    `L_MTP-LM` and `L_MTP-KD` are the means over MTP depths of the per-depth terms. A term whose weight is zero may
    be passed as `None` (e.g. `lm=None` while λ = 1) and is then left out of the sum and of the log.

    Args:
        lm (`torch.Tensor` or `None`): Main-head LM loss (scalar).
        kd (`torch.Tensor` or `None`): Main-head KD loss (scalar).
        mtp_lm (`Sequence[torch.Tensor]`): MTP-LM loss of each depth 1..D (empty without MTP heads).
        mtp_kd (`Sequence[torch.Tensor]`): MTP-KD loss of each depth 1..D, same length as `mtp_lm` (or empty when
            its weight `β·λ` is zero; `mtp_lm` may be empty when `β·(1 - λ)` is zero).
        lam (`float`): λ in [0, 1], the KD weight.
        beta (`float`): β >= 0, the MTP weight.

    Returns:
        `tuple[torch.Tensor, dict[str, torch.Tensor]]`: the total loss, and detached terms for logging: `lm`, `kd`,
        `mtp_lm`, `mtp_kd` (depth means), `mtp_lm_{k}` / `mtp_kd_{k}` per depth `k` (1-based), and `total`.
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (λ, the KD weight) must be a number in [0, 1], got {lam!r}.")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0.0:
        raise ValueError(f"beta (β, the MTP weight) must be a number >= 0, got {beta!r}.")
    mtp_lm, mtp_kd = list(mtp_lm), list(mtp_kd)
    if mtp_lm and mtp_kd and len(mtp_lm) != len(mtp_kd):
        raise ValueError(
            f"mtp_lm and mtp_kd must have one loss per MTP depth each, got {len(mtp_lm)} and {len(mtp_kd)}."
        )
    weights = {
        "lm": 1.0 - lam,
        "kd": lam,
        "mtp_lm": beta * (1.0 - lam),
        "mtp_kd": beta * lam,
    }
    values: dict[str, torch.Tensor | None] = {
        "lm": lm,
        "kd": kd,
        "mtp_lm": torch.stack(mtp_lm).mean() if mtp_lm else None,
        "mtp_kd": torch.stack(mtp_kd).mean() if mtp_kd else None,
    }
    total: torch.Tensor | None = None
    logs: dict[str, torch.Tensor] = {}
    for name, value in values.items():
        if value is None:
            if weights[name] != 0.0:
                hint = "a loss per MTP depth" if name.startswith("mtp") else "a scalar loss"
                raise ValueError(
                    f"{name} is missing but its weight is {weights[name]:g} (lam={lam}, beta={beta}); pass {hint}, "
                    "or set the weights so that this term's weight is 0."
                )
            continue
        term = weights[name] * value
        total = term if total is None else total + term
        logs[name] = value.detach()
    for name, per_depth in (("mtp_lm", mtp_lm), ("mtp_kd", mtp_kd)):
        for k, value in enumerate(per_depth, start=1):
            logs[f"{name}_{k}"] = value.detach()
    if total is None:
        raise ValueError("slimqwen_objective needs at least one loss term (lm or kd), got none.")
    logs["total"] = total.detach()
    return total, logs


def _head_at(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The head weight at the hidden states' width (an elastic variant uses a prefix of the hidden channels)."""
    return weight if weight.shape[1] == hidden.shape[-1] else weight[:, : hidden.shape[-1]]


def _counted_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None, depth: int) -> torch.Tensor:
    counted = labels[:, 1 + depth :].ne(-100)
    if attention_mask is not None:
        counted = counted & attention_mask[:, 1 + depth :].bool()
    return counted.sum()


def distillation_objective(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    labels: Sequence[torch.Tensor],
    *,
    lam: float,
    beta: float,
    mtp_hidden: Sequence[torch.Tensor] = (),
    teacher_mtp_hidden: Sequence[torch.Tensor] = (),
    head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    mtp_num_items: Mapping[int, torch.Tensor] | None = None,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    teacher_top_k: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    recompute: bool = False,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """SlimQwen's objective ([`slimqwen_objective`]) of one student forward, every term computed from hidden states.

    Depth 0 is the main head and depth `k >= 1` the MTP head `k`. Each depth has an LM term ([`lm_loss`] of
    `labels[k]` shifted by `1 + k`) and a KD term ([`mtp_kd_loss`]: the teacher's distribution for the same token,
    from the teacher's own depth-`k` head when `teacher_mtp_hidden` is given, else from its main head at position
    `i + k`). A term's summed loss is divided by `num_items_in_batch` (depth 0) or `mtp_num_items[k]` when given (the
    targets of the whole accumulation window, so accumulation matches one large batch), else by its counted targets
    in this batch. A term whose weight is 0 is still computed for the logs, without a graph.

    Args:
        hidden (`torch.Tensor`): Student final hidden states `[B, T, H]`.
        head_weight (`torch.Tensor`): Student `lm_head` weight `[V, H']`, `H' >= H` (an elastic variant of width `H`
            uses the first `H` columns).
        teacher_hidden (`torch.Tensor`): Teacher final hidden states `[B, T, H_t]` (or, for self-distillation, the
            full student's).
        teacher_head_weight (`torch.Tensor`): Teacher `lm_head` weight `[V, H_t']`, `H_t' >= H_t`.
        labels (`Sequence[torch.Tensor]`): Unshifted labels `[B, T]` of each depth `0..len(mtp_hidden)`, -100 where
            a target is not counted (e.g. per depth, targets in another packed document).
        lam (`float`): λ in [0, 1], the KD weight.
        beta (`float`): β >= 0, the MTP weight.
        mtp_hidden (`Sequence[torch.Tensor]`, *optional*): Student MTP hidden states of depth `k = 1, 2, ...`,
            `[B, T - k, H]` each.
        teacher_mtp_hidden (`Sequence[torch.Tensor]`, *optional*): The teacher's, same layout; empty: MTP-KD from
            the teacher's main head.
        head_bias, teacher_head_bias (`torch.Tensor`, *optional*): Head biases `[V]`.
        attention_mask (`torch.Tensor`, *optional*): `[B, T]` padding mask.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): Counted main-head targets of the accumulation window.
        mtp_num_items (`Mapping[int, torch.Tensor]`, *optional*): Counted targets of depth `k` in the window.
        temperature, divergence, jsd_beta, teacher_top_k, chunk_size, recompute: As in [`chunked_kd_loss`].

    Returns:
        `tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]`: the loss, and per logged term a detached
        `(value, weight)` pair whose running mean over a logging window is `sum(value) / sum(weight)`: `lm`, `kd`,
        `mtp_lm_{k}`, `mtp_kd_{k}` as (summed loss, counted targets), and `mtp_lm`, `mtp_kd` as (the mean over depths
        of the per-target means, 1).
    """
    if len(labels) < 1 + len(mtp_hidden):
        raise ValueError(
            f"labels must hold the labels of every depth 0..{len(mtp_hidden)} (one per MTP depth besides the main "
            f"head), got {len(labels)}."
        )
    options = dict(chunk_size=chunk_size, recompute=recompute, reduction="sum")
    kd_options = dict(
        options, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta, teacher_top_k=teacher_top_k
    )
    counts = [_counted_targets(labels[k], attention_mask, k) for k in range(len(mtp_hidden) + 1)]
    logs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def denominator(depth: int) -> torch.Tensor:
        if num_items_in_batch is None:
            return counts[depth].clamp_min(1).float()
        if depth == 0:
            return torch.as_tensor(num_items_in_batch, device=hidden.device).float()
        return (mtp_num_items or {}).get(depth, counts[depth]).clamp_min(1).float()

    def term(name: str, depth: int, value: torch.Tensor) -> torch.Tensor:
        logs[name] = (value.detach().float(), counts[depth].float())
        return value / denominator(depth)

    def graph_if(weight: float) -> contextlib.AbstractContextManager:
        # a term with weight 0 is still computed for the logs, but without a graph
        return contextlib.nullcontext() if weight != 0.0 else torch.no_grad()

    student_weight = _head_at(head_weight, hidden)
    lm_terms, kd_terms = [], []
    for k in range(len(mtp_hidden) + 1):
        # depth k has T - k positions; the pad rows are never read
        h = hidden if k == 0 else F.pad(mtp_hidden[k - 1], (0, 0, 0, k))
        if k and teacher_mtp_hidden:
            target, teacher_depth = F.pad(teacher_mtp_hidden[k - 1], (0, 0, 0, k)), k
        else:
            target, teacher_depth = teacher_hidden, 0
        depth_weight = 1.0 if k == 0 else beta
        lm_name, kd_name = ("lm", "kd") if k == 0 else (f"mtp_lm_{k}", f"mtp_kd_{k}")
        with graph_if(depth_weight * (1.0 - lam)):
            lm = lm_loss(h, student_weight, labels[k], depth=k, head_bias=head_bias, **options)
        lm_terms.append(term(lm_name, k, lm))
        with graph_if(depth_weight * lam):
            kd = mtp_kd_loss(
                h, student_weight, target, _head_at(teacher_head_weight, target), k, labels=labels[k],
                attention_mask=attention_mask, teacher_depth=teacher_depth, student_head_bias=head_bias,
                teacher_head_bias=teacher_head_bias, **kd_options,
            )  # fmt: skip
        kd_terms.append(term(kd_name, k, kd))
    loss, _ = slimqwen_objective(lm_terms[0], kd_terms[0], lm_terms[1:], kd_terms[1:], lam, beta)
    for group in ("mtp_lm", "mtp_kd"):
        per_depth = [logs[f"{group}_{k}"] for k in range(1, len(mtp_hidden) + 1)]
        if per_depth:
            mean = torch.stack([value / count.to(value.device).clamp_min(1) for value, count in per_depth]).mean()
            logs[group] = (mean, torch.ones((), device=mean.device))
    return loss, logs


def linear_schedule(start: float, end: float, progress: float) -> float:
    """Linear interpolation from `start` (progress 0) to `end` (progress 1).

    Args:
        start (`float`): Value at the start of training.
        end (`float`): Value at the end of training.
        progress (`float`): Fraction of training done, in [0, 1].

    Returns:
        `float`: `start + (end - start) · progress`.
    """
    p = _check_progress(progress)
    return float(start + (end - start) * p)


def cosine_schedule(start: float, end: float, progress: float) -> float:
    """Half-cosine from `start` (progress 0) to `end` (progress 1), flat at both ends.

    Args:
        start (`float`): Value at the start of training.
        end (`float`): Value at the end of training.
        progress (`float`): Fraction of training done, in [0, 1].

    Returns:
        `float`: `end + (start - end) · (1 + cos(π · progress)) / 2`.
    """
    p = _check_progress(progress)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p)))


_SCHEDULES: dict[str, Callable[[float, float, float], float]] = {
    "linear": linear_schedule,
    "cosine": cosine_schedule,
    "constant": lambda start, end, progress: float(start + 0.0 * _check_progress(progress)),
}


@dataclass
class LossWeightSchedule:
    """Schedules of SlimQwen's KD weight λ and MTP weight β over training progress.

    Defaults are SlimQwen's: λ linear 1.0 -> 0.75, β cosine 0.3 -> 0.1. A `"constant"` schedule keeps the start
    value.

    Args:
        lambda_start (`float`, *optional*, defaults to 1.0): λ at progress 0, in [0, 1].
        lambda_end (`float`, *optional*, defaults to 0.75): λ at progress 1, in [0, 1].
        lambda_schedule (`str`, *optional*, defaults to `"linear"`): `"linear"`, `"cosine"` or `"constant"`.
        beta_start (`float`, *optional*, defaults to 0.3): β at progress 0, >= 0.
        beta_end (`float`, *optional*, defaults to 0.1): β at progress 1, >= 0.
        beta_schedule (`str`, *optional*, defaults to `"cosine"`): `"linear"`, `"cosine"` or `"constant"`.
    """

    lambda_start: float = 1.0
    lambda_end: float = 0.75
    lambda_schedule: str = "linear"
    beta_start: float = 0.3
    beta_end: float = 0.1
    beta_schedule: str = "cosine"

    def __post_init__(self) -> None:
        for name in ("lambda_start", "lambda_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1] (λ weighs KD against LM), got {value!r}.")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
                raise ValueError(f"{name} must be a number >= 0 (β weighs the MTP terms), got {value!r}.")
        for name in ("lambda_schedule", "beta_schedule"):
            value = getattr(self, name)
            if value not in SCHEDULE_KINDS:
                raise ValueError(f"{name} must be one of {SCHEDULE_KINDS}, got {value!r}.")

    def lam(self, progress: float) -> float:
        """λ at `progress` in [0, 1]."""
        return _SCHEDULES[self.lambda_schedule](self.lambda_start, self.lambda_end, progress)

    def beta(self, progress: float) -> float:
        """β at `progress` in [0, 1]."""
        return _SCHEDULES[self.beta_schedule](self.beta_start, self.beta_end, progress)

    def at_step(self, step: int, max_steps: int) -> tuple[float, float]:
        """(λ, β) after `step` of `max_steps` optimizer steps (progress clamped to 1 past the end).

        Args:
            step (`int`): Optimizer steps done, >= 0.
            max_steps (`int`): Total optimizer steps, >= 1.

        Returns:
            `tuple[float, float]`: `(λ, β)`.
        """
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}.")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}.")
        progress = min(step / max_steps, 1.0)
        return self.lam(progress), self.beta(progress)
