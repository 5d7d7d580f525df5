"""SlimQwen's objective: weighing the terms ([`slimqwen_objective`]) and computing them all from one student
forward ([`distillation_objective`])."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .chunked import _head_loss, _loss_dtype, _Segment
from .kd import TeacherTopK, _kd_chunk_loss
from .lm import _ce_chunk_loss, _check_targets
from .mtp import align_mtp_positions
from .options import (
    DEFAULT_CHUNK_SIZE,
    _check_bias,
    _check_head,
    _check_num_items,
    _check_vocab,
    check_kd_options,
)


__all__ = ["distillation_objective", "slimqwen_objective"]


def _check_weights(lam: float, beta: float, mtp_lam: float | None = None) -> float:
    """Checks λ, β and the MTP terms' KD share; returns the share to use (λ when `mtp_lam` is None)."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (λ, the KD weight) must be a number in [0, 1], got {lam!r}.")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0.0:
        raise ValueError(f"beta (β, the MTP weight) must be a number >= 0, got {beta!r}.")
    if mtp_lam is None:
        return lam
    if isinstance(mtp_lam, bool) or not isinstance(mtp_lam, (int, float)) or not 0.0 <= mtp_lam <= 1.0:
        raise ValueError(
            f"mtp_lam (the KD share of the MTP terms) must be a number in [0, 1] or None (follow λ), got {mtp_lam!r}."
        )
    return mtp_lam


def slimqwen_objective(
    lm: torch.Tensor | None,
    kd: torch.Tensor | None,
    mtp_lm: Sequence[torch.Tensor],
    mtp_kd: Sequence[torch.Tensor],
    lam: float,
    beta: float,
    mtp_lam: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SlimQwen's objective `(1 - λ)·L_LM + λ·L_KD + β·((1 - λ)·L_MTP-LM + λ·L_MTP-KD)`.

    `L_MTP-LM` and `L_MTP-KD` are the means over MTP depths of the per-depth terms. A term whose weight is zero may
    be passed as `None` (e.g. `lm=None` while λ = 1) and is then left out of the sum and of the log.

    Args:
        lm (`torch.Tensor` or `None`): Main-head LM loss (scalar).
        kd (`torch.Tensor` or `None`): Main-head KD loss (scalar).
        mtp_lm (`Sequence[torch.Tensor]`): MTP-LM loss of each depth 1..D (empty without MTP heads).
        mtp_kd (`Sequence[torch.Tensor]`): MTP-KD loss of each depth 1..D, same length as `mtp_lm` (or empty when
            its weight `β·λ` (`β·mtp_lam` when given) is zero; `mtp_lm` may be empty when `β·(1 - λ)` is zero).
        lam (`float`): λ in [0, 1], the KD weight.
        beta (`float`): β >= 0, the MTP weight.
        mtp_lam (`float`, *optional*): The KD share of the MTP terms, in [0, 1], replacing λ inside the MTP group:
            `β·((1 - mtp_lam)·L_MTP-LM + mtp_lam·L_MTP-KD)` (0: MTP-LM only, 1: MTP-KD only). None (SlimQwen's
            objective) uses λ.

    Returns:
        `tuple[torch.Tensor, dict[str, torch.Tensor]]`: the total loss, and detached terms for logging: `lm`, `kd`,
        `mtp_lm`, `mtp_kd` (depth means), `mtp_lm_{k}` / `mtp_kd_{k}` per depth `k` (1-based), and `total`.
    """
    mtp_lam = _check_weights(lam, beta, mtp_lam)
    mtp_lm, mtp_kd = list(mtp_lm), list(mtp_kd)
    if mtp_lm and mtp_kd and len(mtp_lm) != len(mtp_kd):
        raise ValueError(
            f"mtp_lm and mtp_kd must have one loss per MTP depth each, got {len(mtp_lm)} and {len(mtp_kd)}."
        )
    weights = {
        "lm": 1.0 - lam,
        "kd": lam,
        "mtp_lm": beta * (1.0 - mtp_lam),
        "mtp_kd": beta * mtp_lam,
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
                    f"{name} is missing but its weight is {weights[name]:g} (lam={lam}, beta={beta}, "
                    f"mtp_lam={mtp_lam}); pass {hint}, "
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


def _check_offline_teacher(
    teacher: TeacherTopK,
    teacher_head_weight: torch.Tensor | None,
    teacher_mtp_hidden: Sequence[torch.Tensor],
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    divergence: str,
    temperature: float,
    jsd_beta: float,
    teacher_top_k: int | None,
    chunk_size: int,
) -> None:
    """Checks of an offline teacher ([`TeacherTopK`]): no head, no MTP hidden states, the student's [batch, seq],
    token ids inside the vocabulary, and a divergence defined against a top-k target."""
    if teacher_head_weight is not None or teacher_mtp_hidden:
        raise ValueError(
            "teacher_hidden is a TeacherTopK (an offline teacher's top-k log-probabilities): teacher_head_weight must "
            "be None and teacher_mtp_hidden empty (MTP-KD reads the same top-k at position i + k)."
        )
    if teacher.log_probs.dim() != 3 or teacher.shape[:2] != hidden.shape[:2]:
        raise ValueError(
            f"the offline teacher's top-k must be [batch, seq, k] with the student's [batch, seq] = "
            f"{tuple(hidden.shape[:2])}, got {tuple(teacher.shape)}."
        )
    if teacher_top_k is not None and teacher_top_k > teacher.k:
        raise ValueError(
            f"teacher_top_k={teacher_top_k} is more than the {teacher.k} tokens per position the offline teacher "
            f"holds; use teacher_top_k <= {teacher.k} (or None for all of them)."
        )
    # a target restricted to k tokens: the same divergences as online top-k
    check_kd_options(divergence, temperature, jsd_beta, teacher_top_k or teacher.k, chunk_size)
    vocab = head_weight.shape[0]
    if teacher.token_ids.numel() and (int(teacher.token_ids.min()) < 0 or int(teacher.token_ids.max()) >= vocab):
        raise ValueError(
            f"the offline teacher's token ids must lie in the student's vocabulary [0, {vocab}), got "
            f"[{int(teacher.token_ids.min())}, {int(teacher.token_ids.max())}]: the logits were written for another "
            "vocabulary."
        )


def _counted_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None, depth: int) -> torch.Tensor:
    counted = labels[:, 1 + depth :].ne(-100)
    if attention_mask is not None:
        counted = counted & attention_mask[:, 1 + depth :].bool()
    return counted.sum()


def distillation_objective(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | TeacherTopK,
    teacher_head_weight: torch.Tensor | None,
    labels: Sequence[torch.Tensor],
    *,
    lam: float,
    beta: float,
    mtp_lam: float | None = None,
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
    in this batch. A term whose weight is 0 is still computed for the logs, without a gradient.

    All terms are computed in one pass over the shared head: each depth's student chunk is projected once for its LM
    and KD terms, and the weighted gradient of the whole objective wrt the head is accumulated in ONE float32
    `[V, H]` buffer (the per-term functions hold one each until backward). Values and gradients are those of the
    per-term functions weighed by [`slimqwen_objective`].

    Args:
        hidden (`torch.Tensor`): Student final hidden states `[B, T, H]`.
        head_weight (`torch.Tensor`): Student `lm_head` weight `[V, H']`, `H' >= H` (an elastic variant of width `H`
            uses the first `H` columns).
        teacher_hidden (`torch.Tensor` or [`TeacherTopK`]): Teacher final hidden states `[B, T, H_t]` (or, for
            self-distillation, the full student's), or an offline teacher's top-k log-probabilities `[B, T, k]`
            (then KD is the online top-k KD with `teacher_top_k` = k, or the given `teacher_top_k <= k`).
        teacher_head_weight (`torch.Tensor`): Teacher `lm_head` weight `[V, H_t']`, `H_t' >= H_t`; None for an
            offline teacher.
        labels (`Sequence[torch.Tensor]`): Unshifted labels `[B, T]` of each depth `0..len(mtp_hidden)`, -100 where
            a target is not counted (e.g. per depth, targets in another packed document).
        lam (`float`): λ in [0, 1], the KD weight.
        beta (`float`): β >= 0, the MTP weight.
        mtp_lam (`float`, *optional*): The KD share of the MTP terms (see [`slimqwen_objective`]); None uses λ.
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
    mtp_lam = _check_weights(lam, beta, mtp_lam)
    check_kd_options(divergence, temperature, jsd_beta, teacher_top_k, chunk_size)
    _check_num_items(num_items_in_batch)
    student_weight = _head_at(head_weight, hidden)
    _check_head("hidden", hidden, "head_weight", student_weight)
    _check_bias("head_bias", head_bias, head_weight)
    offline = isinstance(teacher_hidden, TeacherTopK)
    if offline:
        _check_offline_teacher(teacher_hidden, teacher_head_weight, teacher_mtp_hidden, hidden, head_weight, divergence,
                               temperature, jsd_beta, teacher_top_k, chunk_size)  # fmt: skip
    else:
        _check_vocab(head_weight, teacher_head_weight)
        _check_bias("teacher_head_bias", teacher_head_bias, teacher_head_weight)
        if teacher_top_k is not None and teacher_top_k > teacher_head_weight.shape[0]:
            raise ValueError(
                f"teacher_top_k must be <= the vocabulary size {teacher_head_weight.shape[0]}, got {teacher_top_k}."
            )
    depths = len(mtp_hidden)
    acc = _loss_dtype(student_weight)
    device = hidden.device
    counts = [_counted_targets(labels[k], attention_mask, k) for k in range(depths + 1)]
    t2 = float(temperature) ** 2
    teacher_bias = None if teacher_head_bias is None else teacher_head_bias.detach()

    def denominator(depth: int) -> torch.Tensor:
        if num_items_in_batch is None:
            return counts[depth].clamp_min(1).float()
        if depth == 0:
            return torch.as_tensor(num_items_in_batch, device=device).float()
        return (mtp_num_items or {}).get(depth, counts[depth]).clamp_min(1).float()

    # The objective's weight of each depth's terms: the MTP groups are means over depths.
    weights = [(1.0 - lam, lam)] + [(beta * (1.0 - mtp_lam) / depths, beta * mtp_lam / depths) for _ in range(depths)]
    segments, rows, slots = [], [], []  # slots: per depth, (index of its LM+KD terms, of its LM-only term or None)
    n_terms = 0
    for k in range(depths + 1):
        # depth k has T - k positions; the pad rows are never read
        h = hidden if k == 0 else F.pad(mtp_hidden[k - 1], (0, 0, 0, k))
        if k and teacher_mtp_hidden:
            target, teacher_depth = F.pad(teacher_mtp_hidden[k - 1], (0, 0, 0, k)), k
        else:
            target, teacher_depth = teacher_hidden, 0
        if offline:
            t_weight = None
        else:
            t_weight = _head_at(teacher_head_weight, target).detach()
            _check_head("teacher_hidden", target, "teacher_head_weight", t_weight)
        if k:
            _check_head(f"mtp_hidden[{k - 1}]", h, "head_weight", student_weight)
        s_rows, t_rows, kd_counted = align_mtp_positions(
            h, target.log_probs if offline else target, k, labels=labels[k], attention_mask=attention_mask,
            teacher_depth=teacher_depth,
        )  # fmt: skip
        if offline:  # the same rows of the ids: the teacher's position i + k (align_mtp_positions' offset)
            t_rows = TeacherTopK(t_rows, target.token_ids[:, k : k + t_rows.shape[1]])
        n = s_rows.shape[1]
        targets = labels[k][:, 1 + k : 1 + k + n].reshape(-1).to(device)
        lm_counted = targets != -100
        _check_targets(targets[lm_counted], student_weight.shape[0], -100)
        # KD counts a subset of the LM's rows (the same labels, plus the padding mask): rows counted by both share one
        # projection and one combined gradient; the LM-only rest (padding with a label) is a segment of its own.
        both = kd_counted.reshape(-1).to(device)
        lm_only = lm_counted & ~both
        w_lm, w_kd = weights[k]
        grad_lm, grad_kd = w_lm != 0.0, w_kd != 0.0
        flat = s_rows.reshape(-1, s_rows.shape[-1])
        if not (grad_lm or grad_kd):
            flat = flat.detach()  # no term of this depth is weighed: no gradient reaches its hidden states
        t_flat = t_rows.reshape_rows() if offline else t_rows.detach().reshape(-1, t_rows.shape[-1])
        denom = denominator(k).to(device=device, dtype=acc)
        c_lm, c_kd = w_lm / denom, w_kd * t2 / denom
        every_row = bool(both.all())  # the common case: no copy of the rows
        chunk = _kd_chunk_loss(
            t_flat if every_row else t_flat[both.to(t_flat.device)], t_weight, teacher_bias, divergence,
            float(temperature), float(jsd_beta), teacher_top_k, targets=targets if every_row else targets[both],
            grad_terms=(grad_lm, grad_kd),
        )  # fmt: skip
        segments.append(_Segment(chunk, torch.stack([c_lm, c_kd]), grad=grad_lm or grad_kd))
        rows.append(flat if every_row else flat[both])
        slot = (n_terms, None)
        n_terms += 2
        if bool(lm_only.any()):
            segments.append(_Segment(_ce_chunk_loss(targets[lm_only]), c_lm.reshape(1), grad=grad_lm))
            rows.append(flat[lm_only])
            slot = (slot[0], n_terms)
            n_terms += 1
        slots.append(slot)
    loss, terms = _head_loss(student_weight, head_bias, segments, rows, chunk_size, recompute)
    logs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, (i, j) in enumerate(slots):
        lm_name, kd_name = ("lm", "kd") if k == 0 else (f"mtp_lm_{k}", f"mtp_kd_{k}")
        lm_sum = terms[i] if j is None else terms[i] + terms[j]
        logs[lm_name] = (lm_sum.float(), counts[k].float())
        logs[kd_name] = ((terms[i + 1] * t2).float(), counts[k].float())
    for group in ("mtp_lm", "mtp_kd"):
        per_depth = [logs[f"{group}_{k}"] for k in range(1, depths + 1)]
        if per_depth:
            mean = torch.stack([value / count.to(value.device).clamp_min(1) for value, count in per_depth]).mean()
            logs[group] = (mean, torch.ones((), device=mean.device))
    return loss, logs
