"""Write a checkpoint tensor by tensor, in the family's stored layout, as sharded safetensors files.

Each tensor goes straight to the open shard file: the file starts with room reserved for its header, data follows
as tensors arrive, and the header (computed from the tensors written) fills the reserved room, padded with spaces as
the safetensors format allows, when the shard is full. Nothing beyond the tensor being written is held in memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..anatomy import ArchSpec
from ..models.slim_moe.loading_slim_moe import _SAFETENSORS_DTYPES
from ..utils import parse_size
from .reader import WEIGHTS_INDEX_NAME, WEIGHTS_NAME

__all__ = ["ShardedCheckpointWriter"]

_DTYPE_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


class _Shard:
    """One shard file being written: header room first, then each tensor's bytes as it comes."""

    def __init__(self, path: Path, reserve: int):
        self.path = path
        self.reserve = reserve
        self.entries: dict[str, dict[str, Any]] = {}
        self.size = 0
        self.handle = open(path, "wb")
        self.handle.seek(8 + reserve)

    def write(self, name: str, tensor: torch.Tensor) -> int:
        data = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.zeros(0, dtype=torch.uint8)
        self.handle.write(memoryview(data.numpy()))
        nbytes = data.numel()
        self.entries[name] = {
            "dtype": _DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.size, self.size + nbytes],
        }
        self.size += nbytes
        return nbytes

    def finish(self, metadata: dict[str, str]) -> None:
        """Write the header into the reserved room, or, when it does not fit, rewrite the file with a larger one."""
        header = json.dumps({"__metadata__": metadata, **self.entries}, separators=(",", ":")).encode()
        room = len(header) + (-(8 + len(header)) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        if room <= self.reserve:
            self.handle.seek(0)
            self.handle.write(self.reserve.to_bytes(8, "little") + header.ljust(self.reserve, b" "))
            self.handle.close()
            return
        self.handle.close()
        moved = self.path.with_name(self.path.name + ".data")
        self.path.rename(moved)
        with open(moved, "rb") as src, open(self.path, "wb") as dst:
            dst.write(room.to_bytes(8, "little") + header.ljust(room, b" "))
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, dst, 16 << 20)
        moved.unlink()

    def discard(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        self.path.unlink(missing_ok=True)


class ShardedCheckpointWriter:
    """Write tensors in the model's naming as the family's stored layout, sharded like `save_pretrained`.

    Args:
        folder (`str` or `os.PathLike`): output folder (created if needed; it must not hold weights already).
        spec ([`~hf_slim.anatomy.ArchSpec`]): the family, whose `stored_layout` says what `save_pretrained` writes
            (a fused experts tensor becomes one tensor per expert and projection).
        config: the config of the model being written.
        max_shard_size (`int` or `str`, defaults to `"5GB"`): as `save_pretrained` reads it (`"5GB"` is 5 * 10**9
            bytes); a tensor larger than this gets a shard of its own.
        metadata (`dict[str, str]`, optional): added to every shard's safetensors metadata (`{"format": "pt"}`).

    Shards are written as tensors arrive (greedily, in arrival order); `close()` names them
    `model-0000i-of-0000n.safetensors` and writes `model.safetensors.index.json` (`total_size`, `weight_map`), or
    names a single shard `model.safetensors` without an index, as `save_pretrained` does. Leaving a `with` block on an
    exception removes every file the writer created. `bytes_written` counts tensor bytes.

    Example:
        ```python
        >>> with ShardedCheckpointWriter(out, spec=get_spec(config), config=config, max_shard_size="2GB") as w:
        ...     for name in reader.names():
        ...         w.add(name, reader.read(name))
        ```
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        spec: ArchSpec,
        config: Any,
        max_shard_size: int | str = "5GB",
        metadata: dict[str, str] | None = None,
    ):
        self.max_shard_size = parse_size(max_shard_size, "max_shard_size")
        self.folder = Path(folder)
        self.spec = spec
        self.config = config
        self.metadata = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = sorted(p.name for p in self.folder.glob("model*.safetensors*"))
        if existing:
            raise FileExistsError(f"{self.folder} already holds weights ({existing[0]}); write into an empty folder.")
        # header room per shard: ample for a 5GB shard of ~100-byte header entries, a sliver of the shard's size
        self._reserve = max(4096, min(1 << 20, self.max_shard_size // 4096)) // 8 * 8
        self._done: list[_Shard] = []
        self._current: _Shard | None = None
        self._names: set[str] = set()
        self._parameters = 0
        self.bytes_written = 0
        self.closed = False

    # ---- adding tensors -----------------------------------------------------------------------------------------
    def stored(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The `(stored name, tensor)` pieces `name` is written as (one per expert and part for fused experts)."""
        block, rel = self.spec.split_name(name)
        if block is None:
            return [(name, tensor)]
        layout = self.spec.stored_layout
        stack = layout.stack_for(rel)
        if stack is None:
            return [(f"{block}.{layout.to_stored(rel)}", tensor)]
        n_parts = len(stack.stored)
        size = tensor.shape[stack.dim]
        if tensor.ndim <= stack.dim or size % n_parts:
            raise ValueError(
                f"{name}: shape {list(tensor.shape)} does not split into {n_parts} parts along dim {stack.dim}."
            )
        part = size // n_parts
        return [
            (f"{block}.{stack.stored_name(e, p)}", tensor[e].narrow(stack.dim - 1, p * part, part))
            for e in range(tensor.shape[0])
            for p in range(n_parts)
        ]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write tensor `name` (model naming) to the current shard, split into the stored layout."""
        if self.closed:
            raise ValueError(f"the writer for {self.folder} is closed; cannot add {name!r}.")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was added twice.")
        if tensor.dtype not in _DTYPE_CODES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors.")
        self._names.add(name)
        self._parameters += tensor.numel()
        for stored, piece in self.stored(name, tensor.detach()):
            piece = piece.to("cpu").contiguous()
            nbytes = piece.numel() * piece.element_size()
            current = self._current
            if current is not None and current.entries and current.size + nbytes > self.max_shard_size:
                self._finish()
            if nbytes > self.max_shard_size:  # a shard of its own, as save_pretrained does
                self._finish()
                self.bytes_written += self._shard().write(stored, piece)
                self._finish()
                continue
            self.bytes_written += self._shard().write(stored, piece)

    def _shard(self) -> _Shard:
        if self._current is None:
            path = self.folder / f"model-{len(self._done) + 1:05d}.safetensors.partial"
            self._current = _Shard(path, self._reserve)
        return self._current

    def _finish(self) -> None:
        if self._current is not None and self._current.entries:
            self._current.finish(self.metadata)
            self._done.append(self._current)
        elif self._current is not None:
            self._current.discard()
        self._current = None

    # ---- closing --------------------------------------------------------------------------------------------------
    def close(self) -> list[Path]:
        """Finish the last shard, give the shards their final names, write the index; returns the weight files."""
        if self.closed:
            return []
        self._finish()
        self.closed = True
        if not self._done:
            raise ValueError(f"no tensors were added to the writer for {self.folder}.")
        n = len(self._done)
        names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for shard, final in zip(self._done, names):
            shard.path.rename(self.folder / final)
            shard.path = self.folder / final
        files = [self.folder / name for name in names]
        if n > 1:
            index = {
                "metadata": {"total_parameters": self._parameters, "total_size": self.bytes_written},
                "weight_map": {key: final for shard, final in zip(self._done, names) for key in shard.entries},
            }
            (self.folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files

    def abort(self) -> None:
        """Remove every file the writer created (nothing is left half-written)."""
        if self._current is not None:
            self._current.discard()
            self._current = None
        for shard in self._done:
            shard.discard()
        if self.closed and len(self._done) > 1:
            (self.folder / WEIGHTS_INDEX_NAME).unlink(missing_ok=True)
        self._done = []
        self.closed = True

    def __enter__(self) -> ShardedCheckpointWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise

    @property
    def num_shards(self) -> int:
        """Shards finished so far (plus the open one)."""
        return len(self._done) + (1 if self._current is not None and self._current.entries else 0)

    def __repr__(self) -> str:
        size = math.ceil(self.bytes_written / 1e6)
        return f"ShardedCheckpointWriter({str(self.folder)!r}, {len(self._names)} tensors, ~{size} MB)"
