"""[`write_teacher_logits`]: run a teacher once over a dataset and keep its top-k distribution of every position.

Memory is bounded by one batch of the teacher's activations, one `[chunk_size, vocab]` float32 projection and the
rows of the shard being filled (`max_shard_size`). Every shard and `teacher_logits.json` are written to a temporary
name and renamed, and `teacher_logits.json` lists the finished shards, so a killed run continues after the last
finished shard when the same command runs again (the rows it skips are checked to be the same rows).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..losses.chunked import _project
from ..utils import parse_size
from .store import FORMAT_VERSION, LOG_PROB_DTYPES, META_FILE, SHARD_PATTERN, TeacherLogitsReader, tokenizer_fingerprint


__all__ = ["check_output_folder", "prepare_rows", "write_teacher_logits"]

logger = logging.getLogger(__name__)

_TMP = ".tmp-"


def prepare_rows(
    dataset: Iterable[dict[str, Any]], tokenizer: Any, max_length: int, dataset_text_field: str = "text"
) -> Iterator[tuple[list[int], list[int] | None]]:
    """`(input_ids, labels or None)` of each dataset row, truncated to `max_length`, as the distillation trainer
    would train on it: an `input_ids` column (with `labels` when present) as is; a text column tokenized with an
    EOS token appended when missing (TRL's SFT preparation); `messages` through the tokenizer's chat template."""
    for index, example in enumerate(dataset):
        labels = None
        if "input_ids" in example:
            ids = list(example["input_ids"])
            labels = list(example["labels"]) if example.get("labels") is not None else None
        elif dataset_text_field in example:
            text = example[dataset_text_field]
            if not isinstance(text, str):
                raise ValueError(f"row {index}: {dataset_text_field!r} must be a string, got {type(text).__name__}.")
            if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
                text += tokenizer.eos_token
            ids = tokenizer(text)["input_ids"]
        elif "messages" in example:
            ids = list(tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True)["input_ids"])
        else:
            raise ValueError(
                f"row {index} has columns {sorted(example)}; the teacher-logits writer needs 'input_ids', "
                f"{dataset_text_field!r} (text, set by dataset_text_field) or 'messages'."
            )
        if not ids:
            raise ValueError(f"row {index} has no tokens; remove empty rows from the dataset.")
        if labels is not None and len(labels) != len(ids):
            raise ValueError(f"row {index}: labels has {len(labels)} entries for {len(ids)} input_ids.")
        yield ids[:max_length], None if labels is None else labels[:max_length]


class _ShardBuffer:
    """The rows of the shard being filled, with their teacher top-k."""

    def __init__(self) -> None:
        self.ids: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.log_probs: list[torch.Tensor] = []
        self.top_ids: list[torch.Tensor] = []
        self.rest: list[torch.Tensor] = []
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids, labels, log_probs, top_ids, rest) -> None:
        self.ids.append(ids)
        if labels is not None:
            self.labels.append(labels)
        self.log_probs.append(log_probs)
        self.top_ids.append(top_ids)
        self.rest.append(rest)
        self.nbytes += sum(t.numel() * t.element_size() for t in (ids, log_probs, top_ids, rest))

    def tensors(self, has_labels: bool) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([0] + [t.numel() for t in self.ids], dtype=torch.int64)
        out = {
            "input_ids": torch.cat(self.ids).to(torch.int32),
            "row_offsets": lengths.cumsum(0),
            "top_k_log_probs": torch.cat(self.log_probs),
            "top_k_ids": torch.cat(self.top_ids).to(torch.int32),
            "rest_log_prob": torch.cat(self.rest).float(),
        }
        if has_labels:
            out["labels"] = torch.cat(self.labels).to(torch.int32)
        return out


def _ids_digest(rows: Iterable[tuple[list[int], list[int] | None]]) -> str:
    digest = hashlib.sha256()
    for ids, labels in rows:
        digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        if labels is not None:
            digest.update(torch.tensor(labels, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_stale(folder: Path) -> None:
    for path in folder.glob(f"*{_TMP}*"):
        logger.warning("Removing %s, left by a run that was killed while writing it.", path)
        path.unlink(missing_ok=True)


class _LoadedTeacher:
    """A teacher model in memory: its decoder runs one batch of rows at a time."""

    def __init__(self, model: nn.Module):
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(f"{type(model).__name__} has no output embeddings; the teacher must be a causal LM.")
        self.model = model.eval()
        if getattr(model, "is_loaded_in_4bit", False):
            # bitsandbytes' packed CPU path cannot run some layer shapes in eval mode (trainers/teacher.py says which);
            # the distillation trainer applies the same fix to an online 4bit teacher
            from trainers.teacher import fit_bnb_4bit_cpu_layers

            fit_bnb_4bit_cpu_layers(model)
        self.head_weight, self.head_bias = head.weight, getattr(head, "bias", None)
        self.vocab_size = int(head.weight.shape[0])
        self.name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))

    def rows_per_pass(self, batch_size: int) -> int:
        return batch_size

    @torch.no_grad()
    def final_hidden(self, ids: torch.Tensor, mask: torch.Tensor, batch_size: int) -> torch.Tensor:
        # the decoder only, as the trainer runs an online teacher (no [tokens, vocab] logits)
        decoder = self.model.get_decoder()
        return decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False).last_hidden_state


@torch.no_grad()
def _teacher_top_k(
    teacher: Any, ids: torch.Tensor, mask: torch.Tensor, top_k: int, chunk_size: int, dtype: torch.dtype,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probabilities `[N, k]` (sorted), ids `[N, k]` and rest log-mass `[N]` of the real
    positions (`mask`) of a padded batch, projected `chunk_size` rows at a time (as the trainer projects online)."""
    hidden = teacher.final_hidden(ids, mask, batch_size)
    rows = hidden[mask.to(hidden.device).bool()]
    weight, bias = teacher.head_weight, teacher.head_bias
    out_lp, out_ids, out_rest = [], [], []
    for start in range(0, rows.shape[0], chunk_size):
        logits = _project(rows[start : start + chunk_size].to(weight.device), weight, bias)
        log_probs = torch.log_softmax(logits, dim=-1)
        values, index = log_probs.topk(top_k, dim=-1, sorted=True)
        # the mass outside the top k, summed in log space (1 - sum(top k) cancels badly when the top k is nearly all)
        rest = torch.logsumexp(log_probs.scatter_(1, index, float("-inf")), dim=-1)
        out_lp.append(values.to(dtype).cpu())
        out_ids.append(index.to(torch.int32).cpu())
        out_rest.append(rest.float().cpu())
    return torch.cat(out_lp), torch.cat(out_ids), torch.cat(out_rest)


def write_teacher_logits(
    teacher: nn.Module,
    dataset: Iterable[dict[str, Any]],
    output_dir: str | os.PathLike,
    *,
    tokenizer: Any,
    top_k: int = 32,
    max_length: int = 1024,
    batch_size: int = 8,
    max_shard_size: int | str = "2GB",
    log_prob_dtype: str = "float32",
    dataset_text_field: str = "text",
    chunk_size: int = 256,
    teacher_name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TeacherLogitsReader:
    """Run `teacher` once over `dataset` and write its top-k distribution of every position to `output_dir`.

    The folder is the training data of an offline distillation run (`SlimDistillationConfig(teacher_logits_dir=...)`):
    it holds the rows' tokens next to the teacher's top-k log-probabilities, token ids and the mass outside the top k
    (layout: `hf_slim.teacher_logits.store`). Running the same call again on an unfinished folder resumes it.

    Args:
        teacher (`nn.Module` or [`LayerwiseTeacher`]): A causal LM (`get_decoder()`, `get_output_embeddings()`), in
            any dtype, quantized or dispatched with a `device_map` (put in eval mode here); or a checkpoint read one
            decoder block at a time, for a teacher larger than memory.
        dataset (`Iterable[dict]`): Rows with `input_ids` (and optional `labels`), a text column or `messages`.
        output_dir (`str` or `os.PathLike`): The folder to write.
        tokenizer: The tokenizer of the teacher and the student (its vocabulary is fingerprinted in the folder).
        top_k (`int`, defaults to 32): Tokens kept per position.
        max_length (`int`, defaults to 1024): Rows are truncated to it (the training run's `max_length`).
        batch_size (`int`, defaults to 8): Rows per teacher forward.
        max_shard_size (`int` or `str`, defaults to `"2GB"`): Shard size; also bounds the rows held in memory.
        log_prob_dtype (`str`, defaults to `"float32"`): `"float32"`, `"bfloat16"` or `"float16"`.
        dataset_text_field (`str`, defaults to `"text"`): The text column.
        chunk_size (`int`, defaults to 256): Positions projected on the vocabulary at a time.
        teacher_name (`str`, *optional*): Recorded in `teacher_logits.json` (defaults to the teacher's
            `name_or_path`); a resumed run must give the same.
        overwrite (`bool`, defaults to `False`): Replace a folder that holds other logits (else a `ValueError` names
            the setting that differs) or a finished one.
        progress (`bool`, defaults to `True`): Show a progress bar.

    Returns:
        [`TeacherLogitsReader`] of the finished folder.
    """
    for name, value, low in (("top_k", top_k, 1), ("max_length", max_length, 2), ("batch_size", batch_size, 1),
                             ("chunk_size", chunk_size, 1)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    if log_prob_dtype not in LOG_PROB_DTYPES:
        raise ValueError(f"log_prob_dtype must be one of {sorted(LOG_PROB_DTYPES)}, got {log_prob_dtype!r}.")
    shard_bytes = parse_size(max_shard_size, "max_shard_size")
    runner = teacher if hasattr(teacher, "final_hidden") else _LoadedTeacher(teacher)
    vocab = runner.vocab_size
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be between 1 and the teacher's vocabulary size {vocab}, got {top_k}.")
    num_rows = len(dataset) if hasattr(dataset, "__len__") else None
    settings = {
        "teacher": teacher_name or runner.name,
        "top_k": top_k,
        "max_length": max_length,
        "log_prob_dtype": log_prob_dtype,
        "vocab_size": vocab,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "dataset_text_field": dataset_text_field,
    }
    folder = Path(output_dir)
    meta = _start(folder, settings, num_rows, overwrite)
    if meta["complete"]:
        logger.info("%s is already complete (%d rows); nothing to do.", folder, meta["num_rows"])
        return TeacherLogitsReader(folder)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dtype = LOG_PROB_DTYPES[log_prob_dtype]
    rows = prepare_rows(dataset, tokenizer, max_length, dataset_text_field)
    done = sum(s["num_rows"] for s in meta["shards"])
    for shard in meta["shards"]:  # the rows a resumed run skips must be the rows written
        taken = [next(rows) for _ in range(shard["num_rows"])]
        if _ids_digest(taken) != shard["ids_sha256"]:
            raise ValueError(
                f"{folder / shard['file']} was written from other rows than this dataset's rows "
                f"{shard['first_row']}..{shard['first_row'] + shard['num_rows'] - 1}; write the folder again with "
                "overwrite=True, or give the dataset it was started with."
            )
    has_labels = meta.get("has_labels")
    buffer, pending = _ShardBuffer(), []
    from tqdm.auto import tqdm

    bar = tqdm(total=num_rows, initial=done, unit="row", desc="teacher logits", disable=not progress)

    def flush() -> None:
        if not len(buffer):
            return
        index = len(meta["shards"])
        name = SHARD_PATTERN.format(index=index)
        tensors = buffer.tensors(bool(has_labels))
        path = folder / name
        tmp = path.with_name(f"{name}{_TMP}{os.getpid()}")
        from safetensors.torch import save_file

        from safetensors import SafetensorError

        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, path)
        except SafetensorError as error:  # safetensors reports a full disk as its own error, naming no file
            tmp.unlink(missing_ok=True)
            code = errno.ENOSPC if "No space left" in str(error) else errno.EIO
            raise OSError(code, f"writing {path}: {error}; the finished shards stay, run again to resume") from None
        except BaseException:  # an interrupt: no partial shard stays behind
            tmp.unlink(missing_ok=True)
            raise
        first = sum(s["num_rows"] for s in meta["shards"])
        meta["shards"].append({
            "file": name, "first_row": first, "num_rows": len(buffer), "num_tokens": int(tensors["input_ids"].numel()),
            "bytes": path.stat().st_size, "ids_sha256": _ids_digest(pending),
        })  # fmt: skip
        _write_json_atomic(folder / META_FILE, meta)
        buffer.__init__()
        pending.clear()

    while True:
        batch = [row for _, row in zip(range(runner.rows_per_pass(batch_size)), rows)]
        if not batch:
            break
        if has_labels is None:
            has_labels = meta["has_labels"] = batch[0][1] is not None
        if any((labels is not None) != has_labels for _, labels in batch):
            raise ValueError("some rows of the dataset have labels and others do not; give labels for all or none.")
        length = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, (row_ids, _) in enumerate(batch):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            mask[i, : len(row_ids)] = 1
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise ValueError(f"the dataset has token ids outside the teacher's vocabulary [0, {vocab}).")
        log_probs, top_ids, rest = _teacher_top_k(runner, ids, mask, top_k, chunk_size, dtype, batch_size)
        start = 0
        for row_ids, labels in batch:
            end = start + len(row_ids)
            buffer.add(torch.tensor(row_ids), None if labels is None else torch.tensor(labels),
                       log_probs[start:end], top_ids[start:end], rest[start:end])  # fmt: skip
            pending.append((row_ids, labels))
            start = end
            if buffer.nbytes >= shard_bytes:
                flush()
        bar.update(len(batch))
    flush()
    bar.close()
    meta["num_rows"] = sum(s["num_rows"] for s in meta["shards"])
    if not meta["num_rows"]:
        raise ValueError("the dataset has no rows.")
    meta["complete"] = True
    _write_json_atomic(folder / META_FILE, meta)
    return TeacherLogitsReader(folder)


def check_output_folder(output_dir: str | os.PathLike, overwrite: bool = False, **settings: Any) -> dict | None:
    """Check, before any model loads, that `output_dir` can be written with these settings: a new or empty folder,
    an unfinished or finished teacher-logits folder with the same settings (it is resumed), or `overwrite`.

    Returns:
        the folder's metadata when it is resumed, else None.

    Raises:
        `ValueError`: a setting that differs from the folder's (named), or a folder of something else.
    """
    folder = Path(output_dir)
    meta_path = folder / META_FILE
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output_dir {folder} is a file, not a folder.")
    if overwrite:
        return None
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        for key, value in settings.items():
            if meta.get(key) != value:
                raise ValueError(
                    f"{meta_path}: {key} is {meta.get(key)!r} but this run's is {value!r}; resume with the same "
                    "settings, or pass overwrite=True to write the folder again."
                )
        return meta
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(
            f"output_dir {folder} exists and is not a teacher-logits folder; give a new folder, or pass "
            "overwrite=True to replace it."
        )
    return None


def _start(folder: Path, settings: dict[str, Any], num_rows: int | None, overwrite: bool) -> dict[str, Any]:
    """The folder's metadata to continue from: a new one, or the unfinished run's when its settings are these."""
    meta = check_output_folder(folder, overwrite, **settings)
    if meta is not None:
        _remove_stale(folder)
        return meta
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, **settings, "num_rows": num_rows, "has_labels": None,
            "complete": False, "shards": []}  # fmt: skip
    _write_json_atomic(folder / META_FILE, meta)
    return meta
