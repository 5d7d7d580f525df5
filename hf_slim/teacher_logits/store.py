"""The folder of an offline teacher: its layout, and [`TeacherLogitsReader`], which the trainer reads it with.

A folder holds `teacher_logits.json` and shards `logits-00000.safetensors`, ... Each shard holds a run of whole
training rows, concatenated without padding:

- `input_ids` `[N]` int32 and, when the dataset had them, `labels` `[N]` int32: the rows' tokens (the training data);
- `row_offsets` `[rows + 1]` int64: where each row starts in the shard's tokens;
- `top_k_log_probs` `[N, k]`: per position, the teacher's `k` largest log-probabilities over the whole vocabulary at
  temperature 1, sorted from the most likely down (float32, or bfloat16 / float16 to halve the disk);
- `top_k_ids` `[N, k]` int32: their token ids;
- `rest_log_prob` `[N]` float32: the log of the probability mass outside the top `k`, so the stored distribution
  (top `k` plus one "rest" bucket) sums to one.

Position `i` of a row holds the teacher's distribution of token `i + 1`, as the logits at position `i` of a causal LM.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..losses.kd import TeacherTopK


__all__ = ["META_FILE", "TeacherLogitsReader", "tokenizer_fingerprint"]

META_FILE = "teacher_logits.json"
FORMAT_VERSION = 1
SHARD_PATTERN = "logits-{index:05d}.safetensors"
LOG_PROB_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TENSORS = ("input_ids", "row_offsets", "top_k_log_probs", "top_k_ids", "rest_log_prob")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's token -> id map (two tokenizers with the same map tokenize text the same way for
    the purposes of KD: the ids of the stored distributions mean the same tokens)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Row:
    input_ids: torch.Tensor
    labels: torch.Tensor | None
    log_probs: torch.Tensor
    token_ids: torch.Tensor
    rest_log_prob: torch.Tensor


class TeacherLogitsReader:
    """Read a finished teacher-logits folder (written by [`write_teacher_logits`] / `hf-slim teacher-logits`).

    Shards are memory-mapped and read a row at a time, so the reader holds no more than the rows asked for.

    Args:
        folder (`str` or `os.PathLike`): The folder.

    Raises:
        `ValueError`: no `teacher_logits.json`, a folder whose writing has not finished, a missing or truncated shard
            (named), or another format version.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / META_FILE
        if not self.folder.is_dir():
            raise ValueError(f"teacher logits folder {self.folder} does not exist (write one with hf-slim teacher-logits).")
        if not meta_path.is_file():
            raise ValueError(
                f"{self.folder} has no {META_FILE}: it is not a teacher-logits folder (write one with hf-slim "
                "teacher-logits)."
            )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{meta_path} is not valid JSON ({error}).") from None
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise ValueError(f"{meta_path}: format_version must be {FORMAT_VERSION}, got {version!r}.")
        if not meta.get("complete"):
            raise ValueError(
                f"{self.folder} is not finished ({sum(s['num_rows'] for s in meta['shards'])} of "
                f"{meta.get('num_rows', '?')} rows written): run the same hf-slim teacher-logits command again to "
                "resume it."
            )
        self.meta = meta
        self.shards: list[dict[str, Any]] = meta["shards"]
        self._starts = [s["first_row"] for s in self.shards]
        self._handles: dict[int, Any] = {}
        for index, shard in enumerate(self.shards):
            path = self.folder / shard["file"]
            if not path.is_file():
                raise ValueError(
                    f"shard {shard['file']} of {self.folder} is missing ({META_FILE} lists {len(self.shards)} shards); "
                    "copy the whole folder, or write it again."
                )
            if path.stat().st_size != shard["bytes"]:
                raise ValueError(
                    f"shard {path} has {path.stat().st_size} bytes, {META_FILE} says {shard['bytes']}: the file is "
                    "truncated or from another run; write the folder again."
                )

    # ---- what the folder holds ---------------------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def max_length(self) -> int:
        return int(self.meta["max_length"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def num_rows(self) -> int:
        return int(self.meta["num_rows"])

    @property
    def has_labels(self) -> bool:
        return bool(self.meta["has_labels"])

    def __len__(self) -> int:
        return self.num_rows

    def check_compatible(
        self, *, vocab_size: int | None = None, tokenizer: Any = None, max_length: int | None = None
    ) -> None:
        """Raise a `ValueError` naming `teacher_logits.json`'s field when the folder was written for another
        vocabulary size, tokenizer or `max_length` than the run that reads it."""
        where = self.folder / META_FILE
        if vocab_size is not None and int(vocab_size) != self.vocab_size:
            raise ValueError(
                f"{where}: vocab_size is {self.vocab_size} but the student's lm_head has {vocab_size} rows; the logits "
                "were written by a teacher with another vocabulary."
            )
        if tokenizer is not None and self.meta.get("tokenizer_fingerprint"):
            found = tokenizer_fingerprint(tokenizer)
            if found != self.meta["tokenizer_fingerprint"]:
                raise ValueError(
                    f"{where}: tokenizer_fingerprint is {self.meta['tokenizer_fingerprint']} (tokenizer "
                    f"{self.meta.get('tokenizer')!r}) but the run's tokenizer has {found}: the token ids mean other "
                    "tokens. Use the tokenizer the logits were written with."
                )
        if max_length is not None and int(max_length) != self.max_length:
            raise ValueError(
                f"{where}: max_length is {self.max_length} but the run's max_length is {max_length}; set "
                f"max_length={self.max_length}, or write the logits again with --max-length {max_length}."
            )

    # ---- rows --------------------------------------------------------------------------------------------------
    def _handle(self, index: int) -> Any:
        from safetensors import safe_open

        if index not in self._handles:
            self._handles[index] = safe_open(str(self.folder / self.shards[index]["file"]), framework="pt")
        return self._handles[index]

    def row(self, row: int) -> _Row:
        """Row `row` (0-based, over all shards): its tokens, labels and the teacher's top-k per position."""
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} is outside {self.folder}'s {self.num_rows} rows.")
        index = bisect_right(self._starts, row) - 1
        handle = self._handle(index)
        local = row - self._starts[index]
        start, end = (int(v) for v in handle.get_slice("row_offsets")[local : local + 2])
        labels = handle.get_slice("labels")[start:end].long() if self.has_labels else None
        return _Row(
            input_ids=handle.get_slice("input_ids")[start:end].long(),
            labels=labels,
            log_probs=handle.get_slice("top_k_log_probs")[start:end],
            token_ids=handle.get_slice("top_k_ids")[start:end],
            rest_log_prob=handle.get_slice("rest_log_prob")[start:end],
        )

    def dataset(self):
        """The folder's rows as a `datasets.Dataset` with `input_ids`, `labels` (when stored) and `teacher_row` (the
        row's index here, which the trainer reads the teacher's distributions by). Built from the shards' token
        arrays without a Python loop over rows."""
        import pyarrow as pa
        from datasets import Dataset

        columns: dict[str, list] = {"input_ids": [], "labels": [], "teacher_row": []}
        for index, shard in enumerate(self.shards):
            handle = self._handle(index)
            offsets = pa.array(handle.get_tensor("row_offsets").to(torch.int32).numpy())
            for name in ("input_ids", "labels") if self.has_labels else ("input_ids",):
                values = pa.array(handle.get_tensor(name).numpy())
                columns[name].append(pa.ListArray.from_arrays(offsets, values))
            first = shard["first_row"]
            columns["teacher_row"].append(pa.array(range(first, first + shard["num_rows"]), type=pa.int64()))
        table = {name: pa.concat_arrays(parts) for name, parts in columns.items() if parts}
        return Dataset(pa.table(table))

    def batch(
        self, rows: Sequence[int] | torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[TeacherTopK, torch.Tensor]:
        """The teacher's top-k of a collated batch `[B, T]`: `(TeacherTopK [B, T, k], rest_log_prob [B, T])`.

        Each stored row is placed at the batch row's real positions (`attention_mask`, left or right padding); the
        padding positions hold zeros, which no term counts.

        Raises:
            `ValueError`: a batch row whose tokens are not the stored row's (the batch did not come from this folder's
                rows, or a collator changed them: packing, truncation, padding-free flattening).
        """
        rows = [int(r) for r in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
        b, t = input_ids.shape
        if len(rows) != b:
            raise ValueError(f"teacher_row has {len(rows)} entries for a batch of {b} rows.")
        dtype = LOG_PROB_DTYPES[self.meta["log_prob_dtype"]]
        log_probs = torch.zeros(b, t, self.top_k, dtype=dtype)
        token_ids = torch.zeros(b, t, self.top_k, dtype=torch.int32)
        rest = torch.zeros(b, t, dtype=torch.float32)
        ids_cpu = input_ids.cpu()
        mask_cpu = None if attention_mask is None else attention_mask.cpu().bool()
        for i, r in enumerate(rows):
            item = self.row(r)
            where = torch.arange(t) if mask_cpu is None else mask_cpu[i].nonzero().squeeze(1)
            if where.numel() != item.input_ids.numel() or not torch.equal(ids_cpu[i, where], item.input_ids):
                raise ValueError(
                    f"batch row {i} is not row {r} of {self.folder} ({where.numel()} tokens in the batch, "
                    f"{item.input_ids.numel()} stored, or other tokens): train on the folder's own rows, without "
                    "packing or padding_free, which change them."
                )
            log_probs[i, where] = item.log_probs
            token_ids[i, where] = item.token_ids
            rest[i, where] = item.rest_log_prob
        device = input_ids.device
        return TeacherTopK(log_probs.to(device), token_ids.to(device)), rest.to(device)
