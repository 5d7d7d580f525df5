"""Knowledge distillation from hidden states: [`chunked_kd_loss`] and the divergences of one chunk."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .chunked import _add_coef, _ChunkLossFn, _head_loss, _loss_dtype, _project, _scale, _Segment
from .options import (
    DEFAULT_CHUNK_SIZE,
    _check_bias,
    _check_head,
    _check_num_items,
    _check_reduction,
    _check_vocab,
    check_kd_options,
)


__all__ = ["TeacherTopK", "chunked_kd_loss"]


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's distribution at each position as its `k` most likely tokens: an offline teacher (see
    `hf_slim.teacher_logits`), in place of teacher hidden states and a head.

    Args:
        log_probs (`torch.Tensor`): `[..., k]` log-probabilities over the whole vocabulary at temperature 1, each
            row sorted from the most likely token down (a prefix of a row is the top-k' for k' < k).
        token_ids (`torch.Tensor`): `[..., k]` the token ids of those log-probabilities (any integer dtype).

    KD against it equals online KD with `teacher_top_k=k`: the `k` values are renormalised (after dividing by the
    temperature), so the mass outside the top `k` is dropped exactly as online.
    """

    log_probs: torch.Tensor
    token_ids: torch.Tensor

    def __post_init__(self) -> None:
        if self.log_probs.shape != self.token_ids.shape or self.log_probs.dim() < 1:
            raise ValueError(
                "TeacherTopK needs log_probs and token_ids of the same shape [..., k], got "
                f"{tuple(self.log_probs.shape)} and {tuple(self.token_ids.shape)}."
            )
        if not self.log_probs.is_floating_point() or self.token_ids.is_floating_point():
            raise ValueError(
                f"TeacherTopK needs floating log_probs and integer token_ids, got {self.log_probs.dtype} and "
                f"{self.token_ids.dtype}."
            )

    @property
    def k(self) -> int:
        return int(self.log_probs.shape[-1])

    @property
    def shape(self) -> torch.Size:
        """`[..., k]`, so that the leading shape is read like a hidden-state tensor's."""
        return self.log_probs.shape

    def reshape_rows(self) -> TeacherTopK:
        """`[rows, k]`."""
        return TeacherTopK(self.log_probs.reshape(-1, self.k), self.token_ids.reshape(-1, self.k))

    def __getitem__(self, index: Any) -> TeacherTopK:
        return TeacherTopK(self.log_probs[index], self.token_ids[index])

    def detach(self) -> TeacherTopK:
        return self

    @property
    def device(self) -> torch.device:
        return self.log_probs.device


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product `(a * b).sum(-1)` of two `[rows, vocab]` tensors without a `[rows, vocab]` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """`log_softmax(x, -1)` written over `x` (no second `[rows, vocab]` buffer; also faster on CPU, where a fresh
    buffer of that size is page-faulted in). tests/test_kd_memory.py checks that torch computes it exactly."""
    return torch.log_softmax(x, dim=-1, out=x)


def _neg_entropy_(p: torch.Tensor) -> torch.Tensor:
    """Rows of `Σ p log p`, overwriting `p` (with `-p log p`)."""
    return torch.special.entr(p, out=p).sum(-1).neg_()


def _jsd_rows(
    log_ps: torch.Tensor,
    log_m: torch.Tensor,
    kl_t: torch.Tensor,
    jsd_beta: float,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of the generalized JSD `jsd_beta · kl_t + (1 - jsd_beta) · KL(student || m)` and, when a coefficient is
    given, `b ·` its gradient wrt the student logits `+ a · p_student`, from the student's and the mixture's
    log-probabilities and the teacher's part `kl_t`. Overwrites both buffers (the gradient is computed in `log_m`'s,
    `p_student` in `log_ps`'s): nothing `[rows, vocab]` is allocated."""
    diff = torch.sub(log_ps, log_m, out=log_m)
    ps = log_ps.exp_()
    kl_s = _row_dot(ps, diff)
    loss_rows = jsd_beta * kl_t + (1.0 - jsd_beta) * kl_s
    grad = diff.sub_(kl_s.unsqueeze(1)).mul_(ps).mul_(b * (1.0 - jsd_beta)) if b is not None else None
    if a is not None:
        grad = ps.mul_(a) if grad is None else grad.addcmul_(ps, a)
    return loss_rows, grad


def _ce_rows(
    logits: torch.Tensor, targets: torch.Tensor, a: torch.Tensor | None, *, inplace: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of `logits` `[rows, vocab]` against `targets` `[rows, 1]`, and, when `a` is given, `a ·`
    its gradient wrt the logits (`a · (softmax - onehot)`), computed over `logits` when `inplace`."""
    log_p = _log_softmax_(logits) if inplace else torch.log_softmax(logits, dim=-1)
    loss = -log_p.gather(1, targets).sum()
    if a is None:
        return loss, None
    grad = log_p.exp_().mul_(a)
    grad.scatter_add_(1, targets, (-a).expand(targets.shape))
    return loss, grad


def _kd_chunk_loss(
    teacher_hidden: torch.Tensor | TeacherTopK,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    divergence: str,
    temperature: float,
    jsd_beta: float,
    teacher_top_k: int | None,
    targets: torch.Tensor | None = None,
    grad_terms: tuple[bool, ...] | None = None,
) -> _ChunkLossFn:
    """Chunk loss of a divergence between the student chunk and the teacher's distribution at the same rows, terms
    `[kd]`; with `targets` (one token id per row) also the cross-entropy of the same rows, terms `[lm, kd]`.

    Computing both terms of a row block in one function projects the student once for both and builds one combined
    gradient `a · ∂lm + b · ∂kd` (no second `[rows, vocab]` gradient). At temperature 1 the cross-entropy reuses
    the divergence's student log-softmax. `grad_terms` (default: all) says which terms the gradient includes; the
    others are computed for the logs only.

    Softmaxes and gradients are computed in place in the two projections' buffers: forward / reverse KL and the
    top-k forward KL hold at most the two `[chunk, vocab]` projections, the JSD one more (the mixture), and a
    cross-entropy at a temperature other than 1 one more (its own softmax).

    `teacher_hidden` may be a [`TeacherTopK`] of rows (an offline teacher): its stored top-k log-probabilities then
    replace the projected ones (`teacher_weight` is None), with the same arithmetic as `teacher_top_k` online.
    """
    # TRL's convention: the generalized JSD at beta 0 / 1 is the forward / reverse KL.
    if divergence == "jsd" and jsd_beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and jsd_beta == 1.0:
        divergence = "reverse_kl"
    inv_t = 1.0 / temperature
    with_lm = targets is not None
    if grad_terms is None:
        grad_terms = (True, True) if with_lm else (True,)
    lm_grad, kd_grad = (grad_terms[0], grad_terms[1]) if with_lm else (False, grad_terms[0])
    shared = with_lm and inv_t == 1.0  # the cross-entropy's log-softmax is the divergence's
    offline = isinstance(teacher_hidden, TeacherTopK)
    if offline:
        teacher_top_k = teacher_hidden.k if teacher_top_k is None else min(teacher_top_k, teacher_hidden.k)

    def chunk_loss(start: int, end: int, student_logits: Callable[[], torch.Tensor], coefs: torch.Tensor | None):
        with torch.no_grad():
            a = coefs[0] if coefs is not None and lm_grad else None
            # The T² factor is in the caller's coefficient; here only the chain rule through logits / T.
            b = coefs[-1] * inv_t if coefs is not None and kd_grad else None
            s_logits = student_logits()
            tgt = targets[start:end].unsqueeze(1) if with_lm else None
            lm_value, lm_grad_buf = (None, None)
            if with_lm and not shared:
                lm_value, lm_grad_buf = _ce_rows(s_logits, tgt, a, inplace=False)
            a_ps = a if shared else None  # the cross-entropy's p_s part, folded into the divergence's gradient
            if offline:
                t_logits = None
            else:
                t_logits = _project(teacher_hidden[start:end], teacher_weight, teacher_bias)
                if inv_t != 1.0:
                    t_logits.mul_(inv_t)
            if inv_t != 1.0:
                s_logits.mul_(inv_t)
            log_ps = _log_softmax_(s_logits)
            del s_logits
            if shared:
                lm_value = -log_ps.gather(1, tgt).sum()
            want = a_ps is not None or b is not None
            if offline:
                # log-probabilities differ from the logits by a per-row constant, which the renormalisation removes
                top_vals = teacher_hidden.log_probs[start:end, :teacher_top_k].to(log_ps.dtype) * inv_t
                top_idx = teacher_hidden.token_ids[start:end, :teacher_top_k].to(device=log_ps.device, dtype=torch.long)
            elif teacher_top_k is not None:
                top_vals, top_idx = t_logits.topk(min(teacher_top_k, t_logits.shape[-1]), dim=-1, sorted=False)
                del t_logits
            if teacher_top_k is not None:
                log_qk = torch.log_softmax(top_vals, dim=-1)
                qk = log_qk.exp()
                if divergence == "forward_kl":
                    loss_rows = (qk * (log_qk - log_ps.gather(1, top_idx))).sum(-1)
                    grad = log_ps.exp_().mul_(_add_coef(a_ps, b)) if want else None
                    if b is not None:
                        grad.scatter_add_(1, top_idx, qk.mul_(-b))
                else:  # jsd with 0 < beta < 1; the teacher is zero outside its top k, so log m = log((1 - b) p_s) there
                    log_m = log_ps + math.log1p(-jsd_beta)
                    log_m.scatter_(1, top_idx, torch.logaddexp(log_m.gather(1, top_idx), log_qk + math.log(jsd_beta)))
                    kl_t = (qk * (log_qk - log_m.gather(1, top_idx))).sum(-1)
                    loss_rows, grad = _jsd_rows(log_ps, log_m, kl_t, jsd_beta, a_ps, b)
            else:
                log_pt = _log_softmax_(t_logits)
                del t_logits
                if divergence == "forward_kl":
                    pt = log_pt.exp_()
                    cross = _row_dot(pt, log_ps)
                    grad = log_ps.exp_().mul_(_add_coef(a_ps, b)) if want else None
                    if b is not None:
                        grad.addcmul_(pt, -b)
                    loss_rows = _neg_entropy_(pt) - cross
                elif divergence == "reverse_kl":
                    diff = torch.sub(log_ps, log_pt, out=log_pt)
                    ps = log_ps.exp_()
                    loss_rows = _row_dot(ps, diff)
                    grad = diff.sub_(loss_rows.unsqueeze(1)).mul_(ps).mul_(b) if b is not None else None
                    if a_ps is not None:
                        grad = ps.mul_(a_ps) if grad is None else grad.addcmul_(ps, a_ps)
                else:  # jsd, 0 < beta < 1: log m = log(b) + logaddexp(log p_s + log((1 - b) / b), log p_t)
                    log_m = log_ps + (math.log1p(-jsd_beta) - math.log(jsd_beta))
                    torch.logaddexp(log_m, log_pt, out=log_m).add_(math.log(jsd_beta))
                    pt = log_pt.exp_()
                    cross_t = _row_dot(pt, log_m)
                    kl_t = _neg_entropy_(pt) - cross_t
                    del pt, log_pt
                    loss_rows, grad = _jsd_rows(log_ps, log_m, kl_t, jsd_beta, a_ps, b)
            if a_ps is not None:
                grad.scatter_add_(1, tgt, (-a_ps).expand(tgt.shape))
            if lm_grad_buf is not None:
                grad = lm_grad_buf if grad is None else grad.add_(lm_grad_buf)
            kd_value = loss_rows.sum()
            values = torch.stack([lm_value, kd_value]) if with_lm else kd_value.reshape(1)
            return values, grad

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
    total, _ = _head_loss(
        student_head_weight, student_head_bias, [_Segment(chunk_loss, scale.reshape(1))], [h_s], chunk_size, recompute
    )
    return total
