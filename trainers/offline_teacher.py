"""Distillation from a teacher-logits folder (`SlimDistillationConfig.teacher_logits_dir`): the folder's rows as the
datasets, a collator that carries each row's index in the folder, and the teacher's top-k of a collated batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hf_slim.losses import TeacherTopK
from hf_slim.teacher_logits import TeacherLogitsReader

from .distillation_config import SlimDistillationConfig


__all__ = ["TEACHER_ROW", "OfflineTeacher"]

TEACHER_ROW = "teacher_row"  # the dataset column and batch key: the row's index in its teacher-logits folder


class _WithTeacherRow:
    """A collator that collates the rows as `collator` does and adds their `teacher_row` as a `[B]` tensor."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator([{k: v for k, v in example.items() if k != TEACHER_ROW} for example in examples])
        batch[TEACHER_ROW] = torch.tensor([int(example[TEACHER_ROW]) for example in examples])
        return batch


class OfflineTeacher:
    """The teacher of a run whose KD targets are read from teacher-logits folders, one per mode (train / eval).

    Args:
        args ([`SlimDistillationConfig`]): With `teacher_logits_dir` (and optionally `eval_teacher_logits_dir`).
        tokenizer: The run's tokenizer; the folders must have been written with the same vocabulary.

    Raises:
        `ValueError`: a folder that is unfinished, lacks shards, or was written for another tokenizer or
            `max_length` (naming the file and the field).
    """

    def __init__(self, args: SlimDistillationConfig, tokenizer: Any = None):
        self.readers = {"train": TeacherLogitsReader(args.teacher_logits_dir)}
        if args.eval_teacher_logits_dir is not None:
            self.readers["eval"] = TeacherLogitsReader(args.eval_teacher_logits_dir)
        for reader in self.readers.values():
            reader.check_compatible(tokenizer=tokenizer, max_length=args.max_length)

    def datasets(self, train_dataset: Any, eval_dataset: Any) -> tuple[Any, Any]:
        """The train and eval datasets: the folders' rows (the user passes none)."""
        train_dir = self.readers["train"].folder
        if train_dataset is not None:
            raise ValueError(
                f"train_dataset must be None with teacher_logits_dir={str(train_dir)!r}: the folder's rows are the "
                "training data (they were written with the teacher's logits of exactly those tokens)."
            )
        if eval_dataset is not None:
            raise ValueError(
                "eval_dataset must be None with teacher_logits_dir: write the evaluation rows' logits with "
                "hf-slim teacher-logits and set eval_teacher_logits_dir."
            )
        eval_reader = self.readers.get("eval")
        return self.readers["train"].dataset(), None if eval_reader is None else eval_reader.dataset()

    def check_vocabulary(self, vocab_size: int) -> None:
        for reader in self.readers.values():
            reader.check_compatible(vocab_size=vocab_size)

    @staticmethod
    def wrap_collator(collator: Callable) -> Callable:
        return collator if isinstance(collator, _WithTeacherRow) else _WithTeacherRow(collator)

    def top_k(self, mode: str, inputs: dict[str, torch.Tensor]) -> tuple[TeacherTopK, torch.Tensor]:
        """`(TeacherTopK [B, T, k], rest log-mass [B, T])` of a collated batch of mode `"train"` or `"eval"`."""
        if mode not in self.readers:
            raise ValueError(
                "evaluation with teacher_logits_dir needs eval_teacher_logits_dir (the evaluation rows' logits)."
            )
        if TEACHER_ROW not in inputs:
            raise ValueError(
                f"the batch has no {TEACHER_ROW!r}: with teacher_logits_dir the trainer reads the folder's rows and "
                "collates them with their row index; a custom data_collator must keep that key."
            )
        return self.readers[mode].batch(inputs[TEACHER_ROW], inputs["input_ids"], inputs.get("attention_mask"))
