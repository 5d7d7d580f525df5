"""Lazy, read-only views of a checkpoint in the model's state-dict names.

[`CheckpointReader`] reads a safetensors checkpoint folder (one file or shards with an index) through the family's
stored layout (`ArchSpec.stored_layout`): a fused experts tensor such as `model.layers.3.mlp.experts.gate_up_proj`
is assembled from the per-expert tensors `save_pretrained` wrote, reading only the experts, rows and columns asked
for. Every read goes through `SafetensorsFile`, the SlimMoe family's byte-range (`os.preadv`) reader: nothing is
memory-mapped, so memory follows what is read. [`StateDictReader`] offers the same interface over tensors in RAM.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..anatomy import ArchSpec, ExpertStack, get_spec
from ..models.slim_moe.loading_slim_moe import _SAFETENSORS_DTYPES, SafetensorsFile

__all__ = ["CheckpointError", "CheckpointReader", "StateDictReader", "open_checkpoint"]

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_BIN_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Tensors of quantized checkpoints (fp8 block scales, GPTQ/AWQ, bitsandbytes) that pruning cannot slice meaningfully.
_QUANT_LEAVES = frozenset({
    "weight_scale", "weight_scale_inv", "weight_scale_2", "input_scale", "scales", "qweight", "qzeros", "g_idx",
    "absmax", "quant_map", "nested_absmax", "nested_quant_map", "SCB", "weight_format",
})  # fmt: skip
# A read of many small byte runs (a scattered hidden selection of a [vocab, hidden] embedding) is slower than reading
# the dim whole and selecting in memory; above this many reads averaging under _MIN_RUN_BYTES, dims are read whole.
_MAX_READS = 4096
_MIN_RUN_BYTES = 1 << 20
#: What `open_checkpoint` fetches from the Hub: weights, configs, tokenizer files.
HUB_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja")


class CheckpointError(ValueError):
    """A checkpoint folder hf-slim cannot read: missing or truncated files, a `.bin`-only or quantized checkpoint."""


@dataclass
class _Stacked:
    """A fused experts tensor assembled from per-expert stored tensors: `files[e][p]` / `stored[e][p]`."""

    stack: ExpertStack
    files: list[list[str]] = field(default_factory=list)
    stored: list[list[str]] = field(default_factory=list)
    part_sizes: tuple[int, ...] = ()


def _run_index(runs: Sequence[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in runs]) if runs else torch.zeros(0, dtype=torch.long)


def _normalise_runs(name: str, shape: tuple[int, ...], runs_per_dim: Any) -> list[list[tuple[int, int]] | None]:
    if runs_per_dim is None:
        return [None] * len(shape)
    runs_per_dim = list(runs_per_dim)
    if len(runs_per_dim) != len(shape):
        raise ValueError(f"{name}: the tensor has {len(shape)} dims, the selection gives {len(runs_per_dim)}.")
    out: list[list[tuple[int, int]] | None] = []
    for size, runs in zip(shape, runs_per_dim):
        if runs is None:
            out.append(None)
            continue
        runs = [(int(a), int(b)) for a, b in runs]
        if any(not 0 <= a <= b <= size for a, b in runs):
            raise ValueError(f"{name}: runs {runs} fall outside the tensor's shape {list(shape)}.")
        out.append(runs)
    return out


def _read_count(shape: Sequence[int], runs: Sequence[list[tuple[int, int]] | None]) -> tuple[int, int]:
    """`(number of contiguous reads, elements read)` of a runs selection, as `read_safetensors_runs` plans it."""
    lengths = [size if r is None else sum(b - a for a, b in r) for size, r in zip(shape, runs)]
    partial = [d for d, r in enumerate(runs) if r is not None and r != [(0, shape[d])]]
    if not partial:
        return 1, math.prod(lengths)
    inner = partial[-1]
    return math.prod(lengths[:inner]) * len(runs[inner]), math.prod(lengths)


def _read_stored(handle: SafetensorsFile, name: str, runs: list[list[tuple[int, int]] | None]) -> torch.Tensor:
    """`handle.read(name, runs)`, reading the innermost fragmented dims whole when the runs would cost many small
    reads, then selecting them in memory (a pure copy either way, so the result is the same)."""
    shape = handle.shape(name)
    local = list(runs)
    relaxed: list[tuple[int, list[tuple[int, int]]]] = []
    itemsize = torch.empty((), dtype=_dtype_of(handle, name)).element_size()
    while True:
        count, elements = _read_count(shape, local)
        if count <= _MAX_READS or elements * itemsize >= count * _MIN_RUN_BYTES:
            break
        inner = max(d for d, r in enumerate(local) if r is not None and r != [(0, shape[d])])
        relaxed.append((inner, local[inner]))
        local[inner] = None
    out = handle.read(name, local)
    for d, r in relaxed:
        out = out.index_select(d, _run_index(r))
    return out


def _dtype_of(handle: SafetensorsFile, name: str) -> torch.dtype:
    code = handle.header[name]["dtype"]
    if code not in _SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{handle.path}: tensor {name!r} has dtype {code!r}; hf-slim reads {sorted(_SAFETENSORS_DTYPES)}."
        )
    return _SAFETENSORS_DTYPES[code]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _weight_map(folder: Path) -> dict[str, str]:
    """Stored tensor name -> shard file name, from the index or the single file's header."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{index} is not a safetensors index with a weight_map ({_first_line(error)})."
            ) from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard files, got {weight_map!r:.80}.")
        for name, file in weight_map.items():
            if not (folder / file).is_file():
                raise CheckpointError(
                    f"{index} names shard {file!r} (for tensor {name!r}), but {folder / file} does not exist; "
                    "download the checkpoint again."
                )
        return dict(weight_map)
    if (folder / WEIGHTS_NAME).is_file():
        return {}  # filled from the header by the caller
    bins = [name for name in _BIN_NAMES if (folder / name).is_file()]
    if bins:
        raise CheckpointError(
            f"{folder} holds PyTorch .bin weights ({bins[0]}) and no safetensors; convert it to safetensors first "
            "(load it with from_pretrained and save_pretrained it)."
        )
    raise CheckpointError(
        f"{folder} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}; give a safetensors checkpoint folder."
    )


def _open_shard(path: Path) -> SafetensorsFile:
    try:
        handle = SafetensorsFile(path)
    except (ValueError, OSError) as error:
        raise CheckpointError(f"shard {path} is truncated or not a safetensors file ({_first_line(error)}).") from None
    expected = handle.data_start + max((entry["data_offsets"][1] for entry in handle.header.values()), default=0)
    actual = os.path.getsize(path)
    if actual < expected:
        handle.close()
        raise CheckpointError(
            f"shard {path} is truncated: its header describes {expected} bytes but the file has {actual}; download "
            "it again."
        )
    return handle


class CheckpointReader:
    """A lazy, read-only view of a safetensors checkpoint folder in the MODEL's state-dict names.

    Args:
        folder (`str` or `os.PathLike`): a folder with `config.json` and `model.safetensors` (or shards listed in
            `model.safetensors.index.json`), as `save_pretrained` writes it.
        config ([`~transformers.PretrainedConfig`], optional): defaults to `AutoConfig.from_pretrained(folder)`.

    Attributes:
        folder (`Path`), config, spec ([`~hf_slim.anatomy.ArchSpec`]): the family's axes spec.
        bytes_read (`int`): tensor bytes read so far.

    Raises:
        [`CheckpointError`]: no config.json, no safetensors (or `.bin` only), an index naming an absent shard, a shard
            shorter than its header says, or a quantized checkpoint.

    Example:
        ```python
        >>> with CheckpointReader("Qwen3-30B-A3B") as ckpt:
        ...     w = ckpt.read("model.layers.0.mlp.experts.gate_up_proj", [[(0, 4)], None, None])  # experts 0-3 only
        ```
    """

    def __init__(self, folder: str | os.PathLike, *, config: Any = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist.")
        if config is None:
            if not (self.folder / "config.json").is_file():
                raise CheckpointError(f"{self.folder} has no config.json; a checkpoint folder needs its model config.")
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(self.folder)
            except (ValueError, OSError, KeyError) as error:
                raise CheckpointError(f"{self.folder}/config.json cannot be loaded: {_first_line(error)}") from None
        self.config = config
        self.spec: ArchSpec = get_spec(config)
        self._files: dict[str, SafetensorsFile] = {}
        try:
            self._index(_weight_map(self.folder))
        except BaseException:
            self.close()
            raise

    # ---- building the name map --------------------------------------------------------------------------------
    def _index(self, weight_map: dict[str, str]) -> None:
        if not weight_map:
            handle = self._file(WEIGHTS_NAME)
            weight_map = dict.fromkeys(handle.keys(), WEIGHTS_NAME)
        for name, file in weight_map.items():
            if name not in self._file(file):
                raise CheckpointError(
                    f"{self.folder / WEIGHTS_INDEX_NAME} lists {name!r} in {file}, which does not hold it."
                )
        self._check_not_quantized(list(weight_map))
        layout = self.spec.stored_layout
        self._plain: dict[str, tuple[str, str]] = {}
        self._stacked: dict[str, _Stacked] = {}
        order: dict[str, None] = {}
        found: dict[str, dict[tuple[int, int], tuple[str, str]]] = {}
        for stored, file in weight_map.items():
            block, rel = self.spec.split_name(stored)
            if block is None:
                name, expert, part = stored, None, None
            else:
                model_rel, expert, part = layout.from_stored(rel)
                name = f"{block}.{model_rel}"
            if expert is None:
                if name in self._plain or name in found:
                    raise CheckpointError(f"{self.folder}: tensor {name!r} is stored twice (as {stored!r}).")
                self._plain[name] = (file, stored)
            else:
                if name in self._plain:
                    raise CheckpointError(f"{self.folder}: tensor {name!r} is stored both fused and per expert.")
                found.setdefault(name, {})[(expert, part)] = (file, stored)
                stack = layout.stack_for(model_rel)
                self._stacked.setdefault(name, _Stacked(stack))
            order.setdefault(name)
        for name, pieces in found.items():
            self._stack(name, self._stacked[name], pieces)
        self._names = list(order)

    def _stack(self, name: str, entry: _Stacked, pieces: dict[tuple[int, int], tuple[str, str]]) -> None:
        n_parts = len(entry.stack.stored)
        n_experts = 1 + max(e for e, _ in pieces)
        first: list[tuple[tuple[int, ...], torch.dtype]] = []
        for e in range(n_experts):
            files, stored = [], []
            for p in range(n_parts):
                if (e, p) not in pieces:
                    block = name[: -len(entry.stack.model) - 1]
                    missing = f"{block}.{entry.stack.stored_name(e, p)}"
                    raise CheckpointError(
                        f"{self.folder}: {name} is missing expert {e} ({missing!r}); experts 0-{n_experts - 1} must "
                        "all be stored."
                    )
                file, key = pieces[(e, p)]
                handle = self._file(file)
                meta = (handle.shape(key), _dtype_of(handle, key))
                if e == 0:
                    first.append(meta)
                elif meta != first[p]:
                    raise CheckpointError(
                        f"{self.folder}: {key!r} has shape {list(meta[0])} ({meta[1]}), expert 0's part has "
                        f"{list(first[p][0])} ({first[p][1]}); experts of one layer must match."
                    )
                files.append(file)
                stored.append(key)
            entry.files.append(files)
            entry.stored.append(stored)
        d = entry.stack.dim - 1
        shapes = [list(s) for s, _ in first]
        if any(len(s) != len(shapes[0]) or s[:d] + s[d + 1 :] != shapes[0][:d] + shapes[0][d + 1 :] for s in shapes):
            raise CheckpointError(f"{self.folder}: the parts of {name} ({shapes}) differ outside dim {d}.")
        if len({dt for _, dt in first}) > 1:
            raise CheckpointError(f"{self.folder}: the parts of {name} have different dtypes.")
        entry.part_sizes = tuple(s[d] for s in shapes)

    def _check_not_quantized(self, names: list[str]) -> None:
        scales = [n for n in names if n.rsplit(".", 1)[-1] in _QUANT_LEAVES or ".quant_state." in n]
        quant = getattr(self.config, "quantization_config", None)
        if scales or quant:
            method = (
                quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
            ) or "?"
            shown = ", ".join(repr(n) for n in scales[:3]) + (f" and {len(scales) - 3} more" if len(scales) > 3 else "")
            raise CheckpointError(
                f"{self.folder} is a quantized checkpoint (quant_method={method!r}"
                + (f"; scale tensors such as {shown}" if scales else "")
                + ") that hf-slim cannot prune; use the unquantized (bf16/fp16/fp32) weights."
            )

    def _file(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = _open_shard(self.folder / file)
        return self._files[file]

    # ---- the reader interface ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every tensor in checkpoint order, in the model's naming (a fused experts tensor where its first expert
        is)."""
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._plain or name in self._stacked

    def _missing(self, name: str) -> KeyError:
        return KeyError(f"{self.folder} has no tensor {name!r} (model naming).")

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in the model (a fused experts tensor: `[num_experts, ...]`)."""
        if name in self._plain:
            file, stored = self._plain[name]
            return self._file(file).shape(stored)
        if name not in self._stacked:
            raise self._missing(name)
        entry = self._stacked[name]
        shape = list(self._file(entry.files[0][0]).shape(entry.stored[0][0]))
        shape[entry.stack.dim - 1] = sum(entry.part_sizes)
        return (len(entry.files), *shape)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype."""
        if name in self._plain:
            file, stored = self._plain[name]
        elif name in self._stacked:
            file, stored = self._stacked[name].files[0][0], self._stacked[name].stored[0][0]
        else:
            raise self._missing(name)
        return _dtype_of(self._file(file), stored)

    def nbytes(self, name: str) -> int:
        """Bytes the whole tensor takes in its stored dtype."""
        return math.prod(self.shape(name)) * torch.empty((), dtype=self.dtype(name)).element_size()

    def block_names(self, block_prefix: str) -> list[str]:
        """The names of one block's tensors (e.g. `"model.layers.3"`), in checkpoint order."""
        prefix = block_prefix.rstrip(".") + "."
        return [n for n in self._names if n.startswith(prefix)]

    @property
    def bytes_read(self) -> int:
        return sum(handle.bytes_read for handle in self._files.values())

    def read(self, name: str, runs_per_dim: Sequence[Sequence[tuple[int, int]] | None] | None = None) -> torch.Tensor:
        """Tensor `name` (model naming), or a selection of it, in the stored dtype.

        Args:
            name (`str`): a name from [`names`].
            runs_per_dim: one list of `(start, stop)` runs per dim, `None` for a whole dim (the same contract as
                `SafetensorsFile.read`); the result holds each dim's runs back to back in the given order.

        A fused experts tensor reads only the experts its dim-0 runs name; runs along the parts dim (dim 1 of
        `gate_up_proj`) read the gate and up tensors separately.
        """
        if name in self._plain:
            file, stored = self._plain[name]
            handle = self._file(file)
            return _read_stored(handle, stored, _normalise_runs(name, handle.shape(stored), runs_per_dim))
        if name not in self._stacked:
            raise self._missing(name)
        return self._read_stacked(name, self._stacked[name], _normalise_runs(name, self.shape(name), runs_per_dim))

    def _read_stacked(self, name: str, entry: _Stacked, runs: list) -> torch.Tensor:
        shape = self.shape(name)
        d = entry.stack.dim
        experts = _run_index(runs[0]).tolist() if runs[0] is not None else list(range(shape[0]))
        # split the runs along the parts dim at part boundaries, grouping consecutive pieces of one part
        groups: list[tuple[int, list[tuple[int, int]], int]] = []
        starts = [sum(entry.part_sizes[:p]) for p in range(len(entry.part_sizes))]
        for a, b in runs[d] if runs[d] is not None else [(0, shape[d])]:
            for p, (start, size) in enumerate(zip(starts, entry.part_sizes)):
                lo, hi = max(a, start), min(b, start + size)
                if lo >= hi:
                    continue
                piece = (lo - start, hi - start)
                if groups and groups[-1][0] == p:
                    groups[-1][1].append(piece)
                    groups[-1] = (p, groups[-1][1], groups[-1][2] + hi - lo)
                else:
                    groups.append((p, [piece], hi - lo))
        lengths = [len(experts)] + [
            size if r is None else sum(b - a for a, b in r) for size, r in zip(shape[1:], runs[1:])
        ]
        out = torch.empty(lengths, dtype=self.dtype(name))
        for i, e in enumerate(experts):
            pos = 0
            for p, part_runs, length in groups:
                stored_runs = list(runs[1:])
                stored_runs[d - 1] = part_runs
                piece = _read_stored(self._file(entry.files[e][p]), entry.stored[e][p], stored_runs)
                out[i].narrow(d - 1, pos, length).copy_(piece)
                pos += length
        return out

    def close(self) -> None:
        """Close every open shard."""
        for handle in self._files.values():
            handle.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CheckpointReader({str(self.folder)!r}, model_type={self.config.model_type!r}, {len(self._names)} tensors)"
        )


class StateDictReader:
    """[`CheckpointReader`]'s interface over tensors in memory (a model's `state_dict()`, tests).

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): tensors in the model's naming.
        config: the model config (gives the family's spec).
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor], config: Any):
        self.folder: Path | None = None
        self.config = config
        self.spec: ArchSpec = get_spec(config)
        self._tensors = dict(state_dict)
        self.bytes_read = 0

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise KeyError(f"the state dict has no tensor {name!r}.")
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def nbytes(self, name: str) -> int:
        t = self._get(name)
        return t.numel() * t.element_size()

    def block_names(self, block_prefix: str) -> list[str]:
        prefix = block_prefix.rstrip(".") + "."
        return [n for n in self._tensors if n.startswith(prefix)]

    def read(self, name: str, runs_per_dim: Sequence[Sequence[tuple[int, int]] | None] | None = None) -> torch.Tensor:
        """A copy of tensor `name`, or of the selection `runs_per_dim` (see [`CheckpointReader.read`])."""
        t = self._get(name).detach()
        out = t
        for d, runs in enumerate(_normalise_runs(name, tuple(t.shape), runs_per_dim)):
            if runs is not None:
                out = out.index_select(d, _run_index(runs).to(t.device))
        out = out.clone() if out is t else out.contiguous()
        self.bytes_read += out.numel() * out.element_size()
        return out

    def close(self) -> None:
        pass

    def __enter__(self) -> StateDictReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_checkpoint(
    source: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> CheckpointReader:
    """A [`CheckpointReader`] for a local folder or a Hub model id.

    A Hub id is resolved with `huggingface_hub.snapshot_download`, fetching only configs, safetensors weights and
    tokenizer files ([`HUB_PATTERNS`]); it uses the local cache and honours `HF_HUB_OFFLINE`.

    Args:
        source: a checkpoint folder or a Hub model id (`"Qwen/Qwen3-30B-A3B"`).
        revision (`str`, optional): branch, tag or commit of a Hub id.
        token (`str` or `bool`, optional): Hub token (defaults to the logged-in one).

    Raises:
        [`CheckpointError`]: `source` is a file, or neither a folder nor a Hub id that can be fetched, or the
            checkpoint cannot be read (see [`CheckpointReader`]).
    """
    path = Path(source)
    if path.is_dir():
        return CheckpointReader(path)
    if path.exists():
        raise CheckpointError(f"source {str(source)!r} is a file; give a checkpoint folder or a Hub model id.")
    text = str(source)
    if path.is_absolute() or text.startswith(("./", "../", "~", ".\\")) or text.count("/") > 1 or "\\" in text:
        raise CheckpointError(
            f"source {text!r} does not exist: no such local folder ({path.expanduser().absolute()}); give an existing "
            "checkpoint folder or a Hub model id such as 'Qwen/Qwen3-30B-A3B'."
        )
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id=str(source), revision=revision, token=token, allow_patterns=list(HUB_PATTERNS)
        )
    except (ValueError, OSError) as error:  # HFValidationError, offline cache misses and HTTP errors derive from these
        raise CheckpointError(
            f"source {str(source)!r} is neither a local folder nor a Hub model id that can be fetched "
            f"({type(error).__name__}: {_first_line(error)})."
        ) from None
    return CheckpointReader(folder)
