"""Knowledge distillation from hidden states: [`chunked_kd_loss`] and the divergences of one chunk."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .chunked import _ChunkedHeadLoss, _ChunkLossFn, _loss_dtype, _project, _scale
from .options import (
    DEFAULT_CHUNK_SIZE,
    _check_bias,
    _check_head,
    _check_num_items,
    _check_reduction,
    _check_vocab,
    check_kd_options,
)


__all__ = ["chunked_kd_loss"]


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product `(a * b).sum(-1)` of two `[rows, vocab]` tensors without a `[rows, vocab]` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _jsd_rows(
    log_ps: torch.Tensor, log_m: torch.Tensor, kl_t: torch.Tensor, jsd_beta: float, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of the generalized JSD `jsd_beta · kl_t + (1 - jsd_beta) · KL(student || m)` and, when wanted, its
    gradient wrt the student logits, from the student's and the mixture's log-probabilities and the teacher's part
    `kl_t`. Overwrites `log_ps` (the gradient is computed in its buffer; nothing `[rows, vocab]` is allocated after
    `ps`, so the caller's `log_m` costs no extra peak)."""
    ps = log_ps.exp()
    diff = log_ps.sub_(log_m)
    kl_s = _row_dot(ps, diff)
    loss_rows = jsd_beta * kl_t + (1.0 - jsd_beta) * kl_s
    grad = diff.sub_(kl_s.unsqueeze(1)).mul_(ps).mul_(1.0 - jsd_beta) if want_grad else None
    return loss_rows, grad


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
                    loss_rows, grad = _jsd_rows(log_ps, log_m, kl_t, jsd_beta, want_grad)
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
                    loss_rows, grad = _jsd_rows(log_ps, log_m, kl_t, jsd_beta, want_grad)
            if grad is not None and grad_factor != 1.0:
                grad.mul_(grad_factor)
            return loss_rows.sum(), grad

    return chunk_loss


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
