"""Chunked next-token cross-entropy of a head of any depth: [`lm_loss`]."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .chunked import _ChunkLossFn, _head_loss, _loss_dtype, _scale, _Segment
from .kd import _ce_rows
from .options import (
    DEFAULT_CHUNK_SIZE,
    _check_bias,
    _check_chunk_size,
    _check_head,
    _check_num_items,
    _check_reduction,
)


__all__ = ["lm_loss"]


def _ce_chunk_loss(targets: torch.Tensor) -> _ChunkLossFn:
    """Chunk loss of the cross-entropy of the student chunk against hard targets (one per row, all counted), terms
    `[lm]`."""

    def chunk_loss(start: int, end: int, student_logits: Callable[[], torch.Tensor], coefs: torch.Tensor | None):
        with torch.no_grad():
            tgt = targets[start:end].unsqueeze(1)
            loss, grad = _ce_rows(student_logits(), tgt, None if coefs is None else coefs[0], inplace=True)
            return loss.reshape(1), grad

    return chunk_loss


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Counted targets must be token ids of the head's vocabulary."""
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(
            f"labels must be token ids in [0, {vocab}) or ignore_index={ignore_index}, "
            f"got values in [{int(targets.min())}, {int(targets.max())}]."
        )


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
    _check_targets(targets, head_weight.shape[0], ignore_index)
    n_counted = torch.tensor(rows.shape[0], device=rows.device)
    scale = _scale(n_counted, 1.0, reduction, num_items_in_batch, rows.device, _loss_dtype(head_weight))
    segment = _Segment(_ce_chunk_loss(targets), scale.reshape(1))
    total, _ = _head_loss(head_weight, head_bias, [segment], [rows], chunk_size, recompute)
    return total
