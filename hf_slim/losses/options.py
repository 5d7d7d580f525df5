"""Validation of the loss options, shared by every term and by `SlimDistillationConfig`."""

from __future__ import annotations

import math

import torch


__all__ = ["DIVERGENCES", "check_kd_options", "check_same_vocabulary"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum")
DEFAULT_CHUNK_SIZE = 256


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


def check_same_vocabulary(v_student: int, v_teacher: int, *, student: str, teacher: str, fix: str) -> None:
    """KD compares two next-token distributions token by token: both sides must cover the same vocabulary."""
    if v_student != v_teacher:
        raise ValueError(
            f"Vocabulary mismatch: {student} has {v_student} rows but {teacher} has {v_teacher}. KD compares the "
            f"distributions token by token, so both must cover the same vocabulary. {fix}"
        )


def _check_vocab(student_head_weight: torch.Tensor, teacher_head_weight: torch.Tensor) -> None:
    check_same_vocabulary(
        student_head_weight.shape[0],
        teacher_head_weight.shape[0],
        student="student_head_weight",
        teacher="teacher_head_weight",
        fix="If the models share a tokenizer and only the padded head rows differ (e.g. 151936 vs 152064), pass both "
        "heads sliced to the tokenizer length (`weight[:len(tokenizer)]`); otherwise use a teacher with the student's "
        "tokenizer.",
    )
