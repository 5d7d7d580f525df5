"""Checks of a distillation run's inputs that need no model: the dataset's columns and the batch split."""

from __future__ import annotations

from collections.abc import Callable

from datasets import Dataset, IterableDataset

from .distillation_config import SlimDistillationConfig


__all__ = ["check_batch_split", "check_dataset_columns", "check_prepared_dataset"]

_TEXT_COLUMNS = ("messages", "conversations")


def _column_names(dataset: Dataset | IterableDataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:  # an IterableDataset of unknown features
        names = list(next(iter(dataset)).keys())
    return list(names)


def check_dataset_columns(
    dataset: Dataset | IterableDataset | None,
    dataset_text_field: str,
    formatting_func: Callable | None = None,
    name: str = "train_dataset",
) -> None:
    """Raise a `ValueError` before any step when `dataset` has none of the columns the trainer can use.

    Accepted: `input_ids` (tokenized or packed), `dataset_text_field` (plain text), `messages` / `conversations`
    (chat), `prompt` + `completion`, or any columns when a `formatting_func` is given.
    """
    if dataset is None:
        if name == "train_dataset":
            raise ValueError("train_dataset is required (a datasets.Dataset or IterableDataset), got None.")
        return
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"{name} has no rows; give a dataset with at least one example.")
    if formatting_func is not None:
        return
    columns = _column_names(dataset)
    if (
        "input_ids" in columns
        or dataset_text_field in columns
        or any(c in columns for c in _TEXT_COLUMNS)
        or ("prompt" in columns and "completion" in columns)
    ):
        return
    raise ValueError(
        f"{name} has columns {columns} but SlimDistillationTrainer needs one of: 'input_ids' (tokenized or packed "
        f"text), {dataset_text_field!r} (plain text, set by dataset_text_field), 'messages'/'conversations' (chat) "
        "or 'prompt' + 'completion'. Rename the column, set dataset_text_field, or pass formatting_func."
    )


def check_batch_split(args: SlimDistillationConfig, has_eval: bool = False) -> None:
    """Raise a `ValueError` naming the batch size when `accelerator_config.split_batches=True` splits a batch that
    the world size does not divide.

    With `split_batches=True`, `per_device_train_batch_size` (and `per_device_eval_batch_size`) is the global batch,
    cut into one equal part per process; otherwise it is per process and any world size works.

    Args:
        args ([`SlimDistillationConfig`]): The run's settings.
        has_eval (`bool`, *optional*, defaults to `False`): Whether an eval dataset is given (its batch is checked too).
    """
    config = args.accelerator_config
    split = config.get("split_batches", False) if isinstance(config, dict) else getattr(config, "split_batches", False)
    world = int(args.world_size)
    if not split or world <= 1:
        return
    names = ["per_device_train_batch_size"] + (["per_device_eval_batch_size"] if has_eval else [])
    for name in names:
        size = int(getattr(args, name))
        if size % world:
            up = -(-size // world) * world
            raise ValueError(
                f"{name}={size} cannot be split over {world} processes: with accelerator_config.split_batches=True "
                f"it is the global batch, cut into {world} equal parts. Use a multiple of {world} (e.g. {name}={up}), "
                f"or split_batches=False (then {name} is the batch of each process)."
            )


def check_prepared_dataset(dataset: Dataset | IterableDataset | None, name: str, vocab_size: int) -> None:
    """Raise a `ValueError` before any step when the dataset TRL prepared has no rows, or token ids the student's
    embedding cannot look up (which would otherwise be an `IndexError` deep inside torch).

    A map-style dataset is checked whole (Arrow reductions, no Python loop over rows); an `IterableDataset` is not
    read ahead.
    """
    if not isinstance(dataset, Dataset):
        return
    if len(dataset) == 0:
        raise ValueError(
            f"{name} has no rows after TRL's preparation (which drops rows with no counted label, e.g. empty rows or "
            "rows whose labels are all -100); give rows with at least two tokens."
        )
    import pyarrow.compute as pc

    ids = pc.list_flatten(dataset.data.column("input_ids"))
    low, high = pc.min(ids).as_py(), pc.max(ids).as_py()
    if low is not None and (low < 0 or high >= vocab_size):
        bad = next(i for i, row in enumerate(dataset["input_ids"]) if row and (min(row) < 0 or max(row) >= vocab_size))
        raise ValueError(
            f"{name} has token ids in [{low}, {high}] but the student's embedding has {vocab_size} rows (valid ids: "
            f"0..{vocab_size - 1}); the first such row is {bad}. Tokenize with the student's tokenizer."
        )
