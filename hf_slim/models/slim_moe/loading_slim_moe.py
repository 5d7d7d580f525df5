# Copyright 2026 The hf-slim developers. Licensed under the Apache License, Version 2.0.
"""SlimMoe checkpoint loading: shape checks before `from_pretrained`, and loading one elastic variant.

A variant is built on the meta device and filled with prefixes of the full tensors, read either from an in-memory
state dict (`copy_variant`) or straight from the byte ranges of safetensors files (`load_elastic_variant`). This file
is copied next to the weights by `hf_slim.hub.save_for_hub`, so it imports nothing from hf_slim.
"""

import ctypes
import json
import os
import sys
from collections.abc import Callable

import torch
from safetensors import safe_open
from transformers import PreTrainedModel
from transformers.generation import GenerationConfig
from transformers.utils import logging

from .configuration_slim_moe import SlimMoeConfig
from .mtp_slim_moe import checkpoint_weight_map, old_layout_config, old_layout_name


# Under transformers' logger hierarchy, so `transformers.logging.set_verbosity_*` governs these messages as it does
# the library's own (a logger named after this module alone would sit outside it, as TRL's and remote code's do).
logger = logging.get_logger(f"transformers.{__name__}")


def check_pretrained_shapes(model_class: type, pretrained_model_name_or_path: str | os.PathLike, kwargs: dict) -> None:
    """Before `from_pretrained(pretrained_model_name_or_path, **kwargs)`: when it names a local folder, raise what
    `check_checkpoint_shapes` raises (transformers itself only reports size mismatches in a log table)."""
    folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder", "") or "")
    if os.path.isdir(folder) and not kwargs.get("ignore_mismatched_sizes", False):
        config = kwargs.get("config")
        if not isinstance(config, SlimMoeConfig):
            config = SlimMoeConfig.from_pretrained(folder)
        check_checkpoint_shapes(model_class, config, folder)


def check_checkpoint_shapes(model_class: type, config: SlimMoeConfig, folder: str) -> None:
    """Raise `ValueError` naming the first checkpoint tensor whose shape differs from what `config` builds."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        return
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}
    prefix = f"{model_class.base_model_prefix}."
    for file in files:
        with safe_open(os.path.join(folder, file), framework="pt") as handle:
            for name in handle.keys():
                key = name if name in expected or prefix + name not in expected else prefix + name
                if key not in expected:
                    continue
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != expected[key]:
                    raise ValueError(
                        f"Checkpoint tensor {name!r} in {file} has shape {list(shape)} but the config in {folder} "
                        f"builds {list(expected[key])}; the weights and config.json disagree (fix config.json, or "
                        "pass ignore_mismatched_sizes=True to re-initialise mismatched tensors)."
                    )


# ---- slicing a variant out of a tensor source (an in-memory state dict or safetensors slices) -----------------------
# Tensors whose dim 1 holds an axis twice, back to back: experts' gate then up rows, an MTP depth's eh_proj embedding then
# hidden half.
_TWO_PART_DIM1 = ("experts.gate_up_proj", "eh_proj.weight")


def elastic_source_name(name: str, layers: list[int]) -> str:
    """The full model's name of a variant's tensor: decoder layer `j` of the variant is layer `layers[j]`."""
    if name.startswith("model.layers."):
        index, rest = name[len("model.layers.") :].split(".", 1)
        return f"model.layers.{layers[int(index)]}.{rest}"
    return name


def elastic_ranges(name: str, shape: tuple[int, ...], source_shape: tuple[int, ...]) -> tuple[list[tuple[int, int]], ...]:
    """Per dim, the `(start, stop)` ranges of the full tensor that make up the variant's tensor `name` of `shape`:
    the prefix of the dim, or the prefix of each of its fused parts."""
    if len(shape) != len(source_shape):
        raise ValueError(f"elastic variant tensor {name} {list(shape)} does not fit the source {list(source_shape)}.")
    ranges = []
    for dim, (size, full) in enumerate(zip(shape, source_shape)):
        parts = 2 if dim == 1 and name.endswith(_TWO_PART_DIM1) else 1
        if size > full or size % parts or full % parts:
            raise ValueError(f"elastic variant tensor {name} {list(shape)} does not fit the source {list(source_shape)}.")
        part, keep = full // parts, size // parts
        ranges.append([(p * part, p * part + keep) for p in range(parts)] if size != full else [(0, full)])
    return tuple(ranges)


def _slice_tensor(source, ranges: tuple[list[tuple[int, int]], ...], copy: bool = True) -> torch.Tensor:
    """Read the ranges from an in-memory tensor, one slice per part; `copy` clones a single slice (else a view)."""
    split = next((d for d, r in enumerate(ranges) if len(r) > 1), None)
    if split is None:
        out = torch.as_tensor(source[tuple(slice(*r[0]) for r in ranges)])
        return out.clone() if copy else out
    pieces = []
    for part in ranges[split]:
        index = tuple(slice(*part) if d == split else slice(*r[0]) for d, r in enumerate(ranges))
        pieces.append(torch.as_tensor(source[index]))
    return torch.cat(pieces, dim=split)


# ---- reading byte ranges of safetensors files (partial loading) -----------------------------------------------------
# The safetensors layout is public: 8-byte little-endian header length, a JSON header mapping each tensor to its
# `dtype`, `shape` and `data_offsets` (relative to the end of the header), then the raw row-major little-endian data.
# Partial loading reads the needed byte ranges with plain file reads straight into the destination tensor's buffer,
# so no page of a full tensor is ever mapped into the process. `SafetensorsFile` / `read_safetensors_runs` read any
# per-dim runs selection this way; they are also hf_slim's lazy reader for pruning checkpoints tensor by tensor.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _dtype in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _dtype):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _dtype)


def _safetensors_header(path: str) -> tuple[dict, int]:
    """`({tensor name: {"dtype", "shape", "data_offsets"}}, absolute offset of the data section)` of one file."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file: it is shorter than the 8-byte header length.")
        length = int.from_bytes(head, "little")
        if length > os.path.getsize(path) - 8:
            raise ValueError(f"{path} is not a safetensors file: header length {length} exceeds the file size.")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _tensor_runs(
    shape: tuple[int, ...], ranges: tuple[list[tuple[int, int]], ...], itemsize: int
) -> list[tuple[int, int]]:
    """`(source byte offset, byte count)` runs that, read back to back, give the sub-tensor of a row-major tensor of
    `shape` made of `ranges` per dim (`(start, stop)` runs in output order, e.g. from `elastic_ranges`); runs adjacent
    in the source are coalesced."""
    # dims after `inner` are kept whole, so each index of the dims up to `inner` reads one contiguous block
    inner = max((d for d, r in enumerate(ranges) if r != [(0, shape[d])]), default=-1)
    if inner < 0:
        total = itemsize
        for size in shape:
            total *= size
        return [(0, total)] if total else []
    strides = [itemsize] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    outer = [0]
    for d in range(inner):
        outer = [base + i * strides[d] for base in outer for start, stop in ranges[d] for i in range(start, stop)]
    runs: list[tuple[int, int]] = []
    for base in outer:
        for start, stop in ranges[inner]:
            offset, count = base + start * strides[inner], (stop - start) * strides[inner]
            if not count:
                continue
            if runs and runs[-1][0] + runs[-1][1] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + count)
            else:
                runs.append((offset, count))
    return runs


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from file offset `offset` (looping over short reads); returns the bytes read."""
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv (Windows)
            os.lseek(fd, offset + done, os.SEEK_SET)
            got = os.readv(fd, [view[done:]])
        if got <= 0:
            raise OSError(f"unexpected end of file at offset {offset + done} while reading {len(view)} bytes")
        done += got
    return done


def read_safetensors_runs(
    fd: int, header: dict, data_start: int, name: str, runs_per_dim, path: str = "<safetensors file>"
) -> tuple[torch.Tensor, int, int]:
    """Read a selection of tensor `name` from an open safetensors file with plain file reads (nothing is mapped).

    Args:
        fd (`int`): an `os.open` descriptor of the file.
        header (`dict`), data_start (`int`): what `_safetensors_header` returns for the file.
        name (`str`): the tensor.
        runs_per_dim: one list of `(start, stop)` runs per dim (`None` for a whole dim); the result holds, along each
            dim, the runs' indices back to back in the given order (runs may be out of order, not only prefixes).
        path (`str`): the file's name, for error messages.

    Returns:
        `(tensor in the stored dtype, bytes read, number of reads)`; runs adjacent in the file are read at once.
    """
    entry = header[name]
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(
            f"{path}: tensor {name!r} has dtype {entry['dtype']!r}; partial loading reads {sorted(_SAFETENSORS_DTYPES)}."
        )
    if sys.byteorder != "little":  # pragma: no cover
        raise ValueError("partial loading of safetensors files needs a little-endian machine.")
    dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
    source_shape = tuple(entry["shape"])
    if len(runs_per_dim) != len(source_shape):
        raise ValueError(f"{path}: tensor {name!r} has {len(source_shape)} dims, the selection gives {len(runs_per_dim)}.")
    ranges = []
    for size, runs in zip(source_shape, runs_per_dim):
        runs = [(0, size)] if runs is None else [(int(a), int(b)) for a, b in runs]
        if any(not 0 <= a <= b <= size for a, b in runs):
            raise ValueError(f"{path}: runs {runs} fall outside tensor {name!r} of shape {list(source_shape)}.")
        ranges.append(runs)
    shape = tuple(sum(b - a for a, b in runs) for runs in ranges)
    begin, end = entry["data_offsets"]
    out = torch.empty(shape, dtype=dtype)
    itemsize = out.element_size()
    expected = itemsize
    for size in source_shape:
        expected *= size
    if end - begin != expected:
        raise ValueError(f"{path}: tensor {name!r} has {end - begin} data bytes, its dtype and shape need {expected}.")
    if not out.numel():
        return out, 0, 0
    buffer = memoryview((ctypes.c_char * (out.numel() * itemsize)).from_address(out.data_ptr())).cast("B")
    position = reads = 0
    for offset, count in _tensor_runs(source_shape, tuple(ranges), itemsize):
        position += _pread_into(fd, buffer[position : position + count], data_start + begin + offset)
        reads += 1
    return out, position, reads


def _read_safetensors_ranges(
    path: str, header: dict, data_start: int, name: str, shape: tuple[int, ...], fd: int
) -> tuple[torch.Tensor, int, int]:
    """Read variant tensor `name` of `shape` (prefix ranges, see `elastic_ranges`) from an open safetensors file.

    Returns `(tensor, bytes read, number of reads)`.
    """
    ranges = elastic_ranges(name, shape, tuple(header[name]["shape"]))
    return read_safetensors_runs(fd, header, data_start, name, ranges, path)


class SafetensorsFile:
    """One safetensors file read by byte ranges (`os.preadv`), never memory-mapped: the header is parsed once and
    the file stays open until `close()` (or the end of a `with` block).

    ```python
    with SafetensorsFile(path) as f:
        for name in f.keys():
            rows = f.read(name, [[(4, 6), (0, 2)]] + [None] * (len(f.shape(name)) - 1))  # rows 4, 5, 0, 1
    ```

    `bytes_read` and `reads` count what `read` has read so far.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.header, self.data_start = _safetensors_header(self.path)
        self.bytes_read = self.reads = 0
        self._fd: int | None = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read(self, name: str, runs_per_dim=None) -> torch.Tensor:
        """Tensor `name`, or the selection `runs_per_dim` of it (see `read_safetensors_runs`), in the stored dtype."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed.")
        if runs_per_dim is None:
            runs_per_dim = [None] * len(self.header[name]["shape"])
        out, count, reads = read_safetensors_runs(self._fd, self.header, self.data_start, name, runs_per_dim, self.path)
        self.bytes_read += count
        self.reads += reads
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_variant(
    model_class: type,
    config: SlimMoeConfig,
    name: str,
    read: Callable[[str, tuple[int, ...]], torch.Tensor | None],
    read_dtype: Callable[[PreTrainedModel], torch.dtype | None] | None = None,
) -> tuple[PreTrainedModel, dict[str, torch.Tensor], set[str]]:
    """Variant `name` of `config` instantiated on the meta device, and its tensors: prefixes of the full ones.

    `read(full_name, variant_shape)` returns the variant's tensor (see `elastic_ranges`), or `None` when the source
    lacks a tensor the variant ties to another one. `read_dtype(meta model)` may name a dtype each floating tensor is
    cast to as soon as it is read. Returns `(meta model, {name: tensor}, tied names left out)`.
    """
    layers = config.elastic_variant_sizes(name)["layers"]
    variant = config.variant_config(name)
    variant._attn_implementation = config._attn_implementation
    with torch.device("meta"):
        model = model_class(variant)
    tied = set(model._tied_weights_keys or {}) if variant.tie_word_embeddings else set()
    dtype = read_dtype(model) if read_dtype is not None else None
    tensors = {}
    for key, meta in model.state_dict().items():
        if key in tied:
            continue
        source = elastic_source_name(key, layers)
        tensor = read(source, tuple(meta.shape))
        if tensor is None:
            raise ValueError(f"elastic variant {name!r}: the source has no tensor {source!r}.")
        tensors[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return model, tensors, tied


def _build_variant(
    model_class: type,
    config: SlimMoeConfig,
    name: str,
    read: Callable[[str, tuple[int, ...]], torch.Tensor | None],
) -> PreTrainedModel:
    """Instantiate variant `name` on the meta device and fill it with prefixes of the full tensors (see
    `_read_variant`)."""
    model, tensors, tied = _read_variant(model_class, config, name, read)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"elastic variant {name!r}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}.")
    if tied:
        model.tie_weights()
    # non-persistent buffers (the RoPE tables) are rebuilt for the variant's config
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return model


def copy_variant(model: PreTrainedModel, name: str) -> PreTrainedModel:
    """See `SlimMoeForCausalLM.slice_variant`: variant `name` of `model` as a standalone model of copied tensors."""
    state = model.state_dict()

    def read(source: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = state[source]
        return _slice_tensor(tensor.detach(), elastic_ranges(source, shape, tuple(tensor.shape)))

    variant = _build_variant(type(model), model.config, name, read)
    variant.generation_config = GenerationConfig.from_dict(model.generation_config.to_dict())
    variant.train(model.training)
    return variant


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
# Handed on to transformers' own loading, which casts, places and quantizes the variant's tensors as it does a
# checkpoint's: keep-in-fp32 modules, accelerate device maps (and offloading), quantizers.
_LOADING_KWARGS = (
    "dtype", "torch_dtype", "device_map", "max_memory", "offload_folder", "offload_buffers", "low_cpu_mem_usage",
    "quantization_config", "attn_implementation", "experts_implementation", "use_kernels", "kernel_config",
    "allow_all_kernels", "generation_config",
)  # fmt: skip


def _read_dtype(model: PreTrainedModel, loading: dict) -> torch.dtype | None:
    """The dtype to cast each tensor to as soon as it is read, so that a cast load never holds the variant twice;
    `None` (transformers casts) with quantization, `dtype="auto"`, or modules kept in float32 at that dtype."""
    dtype = loading.get("dtype", loading.get("torch_dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or loading.get("quantization_config") is not None:
        return None
    return None if model._get_dtype_plan(dtype) else dtype


def load_elastic_variant(model_class: type, path: str | os.PathLike, name: str, **kwargs) -> PreTrainedModel:
    """Load variant `name` of an elastic checkpoint, reading only its slices.

    The variant is built on the meta device; each of its tensors is allocated at the variant's size and filled with
    plain file reads (`os.preadv`) of exactly the byte ranges it needs, located through the safetensors header
    (adjacent ranges coalesced: a `[:d, :]` prefix is one read, `[:, :d]` one read per row). No page of a full
    tensor is mapped, so peak memory follows the variant's size. The tensors then go through transformers' own
    loading (`from_pretrained` with `state_dict=`), so `dtype`, `device_map` (accelerate), `low_cpu_mem_usage`,
    `quantization_config` and `attn_implementation` act as they do on a full checkpoint. `model.elastic_load_report`
    records the bytes read and the number of reads.

    Raises:
        `TypeError`: an argument partial loading does not take (the message lists those it takes).
    """
    hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    loading = {k: kwargs.pop(k) for k in _LOADING_KWARGS if k in kwargs}
    config = kwargs.pop("config", None)
    # what the Auto classes add on their own
    for key in [k for k in kwargs if k.startswith("_") or k in ("trust_remote_code", "use_safetensors")]:
        kwargs.pop(key)
    if "_adapter_model_path" in (kwargs.pop("adapter_kwargs", None) or {}):
        raise TypeError(f"from_pretrained(..., elastic_variant={name!r}) cannot load a PEFT adapter folder.")
    if kwargs:
        raise TypeError(
            f"from_pretrained(..., elastic_variant={name!r}) does not take {sorted(kwargs)}; it takes config, "
            f"{', '.join(_LOADING_KWARGS)} and the Hub arguments {', '.join(_HUB_KWARGS)}."
        )
    path = str(path)
    if not isinstance(config, SlimMoeConfig):
        config = SlimMoeConfig.from_pretrained(path, **hub_kwargs)
    weight_map = checkpoint_weight_map(path, hub_kwargs)
    config = old_layout_config(config, weight_map)  # the old MTP layout: its tensors are read under their old names
    report = {"variant": name, "bytes_read": 0, "tensors_read": 0, "reads": 0}
    files: dict[str, SafetensorsFile] = {}

    def read(name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        # an old-layout checkpoint holds one tensor for what each MTP depth holds now (see mtp_slim_moe.py)
        source = name if name in weight_map else old_layout_name(name)
        if source not in weight_map:
            return None
        file = weight_map[source]
        if file not in files:
            files[file] = SafetensorsFile(file)
        handle = files[file]
        tensor = handle.read(source, elastic_ranges(name, shape, handle.shape(source)))
        report["tensors_read"] += 1
        return tensor

    try:
        _, tensors, _ = _read_variant(model_class, config, name, read, lambda model: _read_dtype(model, loading))
    finally:
        for handle in files.values():
            handle.close()
    report["bytes_read"] = sum(handle.bytes_read for handle in files.values())
    report["reads"] = sum(handle.reads for handle in files.values())
    report["checkpoint_bytes"] = sum(os.path.getsize(f) for f in set(weight_map.values()))
    generation_config = loading.pop("generation_config", None)
    variant = config.variant_config(name)  # a fresh copy: the meta model above settled its attention implementation
    # PreTrainedModel's own loading, past SlimMoe's (whose checks and MTP conversion are for checkpoint folders)
    model = PreTrainedModel.from_pretrained.__func__(model_class, None, config=variant, state_dict=tensors, **loading)
    model.config.name_or_path = path
    model.elastic_load_report = report
    if generation_config is None:
        try:
            generation_config = GenerationConfig.from_pretrained(path, **hub_kwargs)
        except OSError:
            generation_config = GenerationConfig.from_model_config(model.config)
    model.generation_config = generation_config
    logger.info("loaded elastic variant %r: %d bytes read of %d", name, report["bytes_read"], report["checkpoint_bytes"])
    return model.eval()


__all__ = [
    "SafetensorsFile",
    "check_checkpoint_shapes",
    "copy_variant",
    "elastic_ranges",
    "elastic_source_name",
    "load_elastic_variant",
    "read_safetensors_runs",
]
