"""Multi-token-prediction terms: position alignment by depth, MTP-KD and MTP-LM."""

from __future__ import annotations

import torch

from .kd import chunked_kd_loss
from .lm import lm_loss
from .options import _check_head


__all__ = ["align_mtp_positions", "mtp_kd_loss", "mtp_lm_loss"]


def align_mtp_positions(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    depth: int,
    *,
    teacher_depth: int = 0,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
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
