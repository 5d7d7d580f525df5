"""Checkpoints on disk converted and exported one tensor at a time: the full model is never in memory.

[`convert_checkpoint`] converts a stock MoE checkpoint to SlimMoe or a SlimMoe checkpoint to a stock family, as
`hf_slim.convert.from_hf` / `to_hf` followed by `hf_slim.hub.save_for_hub` do for a loaded model: the config is
translated (`hf_slim.convert.conversion_configs`) and every tensor is copied from the reader (the model's naming)
to a writer in the target family's stored layout. [`stream_export`] is the shared core: it is also how
`hf_slim.elastic.slice_checkpoint` and `make_elastic_checkpoint` write their folders.

Memory holds one output tensor at a time (at most the largest fused experts tensor) and one chunk of its source
([`read_bounded`]), plus the model's structure on the meta device, which has no weights.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from .anatomy import get_spec
from .checkpoints import (
    CheckpointReader,
    ShardedCheckpointWriter,
    StateDictReader,
    open_checkpoint,
)
from .models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM
from .utils import atomic_directory, parse_size

__all__ = [
    "StreamedTensor",
    "convert_checkpoint",
    "held_tensors",
    "meta_model",
    "open_source",
    "parse_dtype",
    "read_bounded",
    "stock_export_tensors",
    "stream_export",
]

T = TypeVar("T")
Reader = CheckpointReader | StateDictReader
#: one safetensors file for the MTP tensors of a stock export, whatever their size
_ONE_FILE = 1 << 62
# `hf_slim.hub` and `hf_slim.convert` are imported where they are used: `import hf_slim` (which exports
# `convert_checkpoint`) stays light for the command line's help.


# ---- small shared pieces --------------------------------------------------------------------------------------------
def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`None`, or the floating-point torch dtype `dtype` names (`torch.bfloat16`, `"bfloat16"`, `"torch.float16"`).

    Raises:
        `ValueError`: `dtype` is not a floating-point torch dtype.
    """
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    raise ValueError(
        f"dtype={dtype!r} is not a floating-point torch dtype; use e.g. 'bfloat16', 'float16' or 'float32'."
    )


def meta_model(config: Any, model_class: type | None = None) -> Any:
    """A causal LM of `config` on the meta device: its modules, names and shapes, no weights and no memory.

    Args:
        config: the model config (copied, so building the model cannot change it).
        model_class (`type`, optional): defaults to the Auto class's causal LM of `config.model_type`.
    """
    config = copy.deepcopy(config)
    with torch.device("meta"):
        if model_class is not None:
            return model_class(config)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config)


def _peek_config(source: str | os.PathLike) -> Any:
    """The config of a folder or Hub id without touching its weights (a Hub id fetches config.json only), or `None`
    when it cannot be had that way; `open_checkpoint` then says what is wrong."""
    from transformers import AutoConfig

    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file() or path.is_file():
        return None
    try:
        return AutoConfig.from_pretrained(path if path.is_dir() else str(source))
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def open_source(source: str | os.PathLike | Reader, check: Callable[[Any], T]) -> Iterator[tuple[Reader, T]]:
    """Open a checkpoint after checking its config, so bad input is refused before any weight is read or fetched.

    Args:
        source: a checkpoint folder, a Hub model id (see `hf_slim.checkpoints.open_checkpoint`), or an open reader
            (left open).
        check (`Callable`): `check(config)` raises on a source the caller cannot use; its result is yielded.

    Yields:
        `(reader, check(config))`.
    """
    if isinstance(source, (CheckpointReader, StateDictReader)):
        yield source, check(source.config)
        return
    config = _peek_config(source)
    checked = check(config) if config is not None else None
    reader = open_checkpoint(source)
    try:
        if config is None:
            checked = check(reader.config)
        yield reader, checked
    finally:
        reader.close()


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n}B"


def held_tensors(reader: Reader, structure: Any, also: Iterable[str] = ()) -> list[str]:
    """The reader's tensor names that the model `structure` (of the source's config) holds, or that `also` names, in
    checkpoint order.

    Other tensors (extra weights some checkpoints carry for other engines, such as `mtp.*` next to a stock model) are
    left out with a warning naming them, as `from_pretrained` leaves them out.
    """
    held = set(structure.state_dict()) | set(also)
    names = reader.names()
    unknown = [name for name in names if name not in held]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        warnings.warn(
            f"{reader.folder or 'the source'}: {len(unknown)} tensor(s) that {type(structure).__name__} does not "
            f"hold are not written ({shown}).",
            stacklevel=3,
        )
    return [name for name in names if name in held]


def read_bounded(
    reader: Reader, name: str, index: tuple[torch.Tensor | None, ...], chunk_bytes: int = 16 << 20
) -> torch.Tensor:
    """`hf_slim.anatomy.read_indexed(reader, name, index)`, read in chunks of output rows (dim 0) so that memory holds
    the result plus one chunk, whatever the selection.

    A selection that permutes or gathers inside the rows (a hidden permutation, one neuron order per expert) makes
    `read_indexed` read whole rows and select in memory, which holds the tensor two or three times; chunk by chunk,
    that overhead is one chunk (`chunk_bytes`, one expert at least) instead. The values are the same, bitwise.
    """
    from .anatomy import read_indexed

    shape = tuple(reader.shape(name))
    if len(shape) < 2:
        return read_indexed(reader, name, index)
    rows = index[0] if index[0] is not None else torch.arange(shape[0])
    out_shape = [rows.numel()] + [size if el is None else el.shape[-1] for size, el in zip(shape[1:], index[1:])]
    itemsize = torch.empty((), dtype=reader.dtype(name)).element_size()
    per = max(1, chunk_bytes // max(1, math.prod(out_shape[1:]) * itemsize))
    if rows.numel() <= per:
        return read_indexed(reader, name, index)
    out = torch.empty(out_shape, dtype=reader.dtype(name))
    for start in range(0, rows.numel(), per):
        stop = min(start + per, rows.numel())
        part = (rows[start:stop], *(el[start:stop] if el is not None and el.ndim == 2 else el for el in index[1:]))
        out[start:stop] = read_indexed(reader, name, part)
    return out


# ---- the export core ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamedTensor:
    """One tensor of the output: its name in the output model's naming and how to read it (from the source reader).

    `source` names what it is read from, for error messages.
    """

    name: str
    read: Callable[[], torch.Tensor]
    source: str = ""


def _tied_aliases(structure: Any) -> set[str]:
    """Parameter names that alias another parameter (a tied `lm_head.weight`): `save_pretrained` does not write them."""
    every = {name for name, _ in structure.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in structure.named_parameters()}


def stream_export(
    reader: Reader,
    output: str | os.PathLike,
    tensors: Iterable[StreamedTensor],
    *,
    structure: Any,
    mtp_structure: Any = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    show_progress: bool = True,
    description: str = "writing checkpoint",
    tokenizer: Any = None,
    generation_config: Any = None,
    card_kwargs: dict[str, Any] | None = None,
    mtp_note: str = "",
) -> Path:
    """Write `tensors` one at a time into a Hub-ready folder for the model `structure`, atomically.

    The folder is what `hf_slim.hub.save_for_hub` writes for a loaded model of `structure`'s class and config holding
    these tensors: weights in the family's stored layout, sharded like `save_pretrained`, config (for SlimMoe with
    `auto_map` and the modeling code), generation config, tokenizer and model card.

    Args:
        reader: the source checkpoint (for its folder and the bytes read).
        output: the output folder.
        tensors (`Iterable[StreamedTensor]`): every tensor of the output, in the output's naming.
        structure: the output model on the meta device (see [`meta_model`]); every tensor is checked against its
            shapes, and every tensor it holds must be written.
        mtp_structure (optional): for a stock output, the SlimMoe model on the meta device whose `mtp.*` tensors are
            kept in [`~hf_slim.hub.MTP_FILE`] beside the stock weights (as `save_for_hub(..., model_type=...)` keeps
            them); tensors named `mtp.*` go there.
        dtype (`torch.dtype`, optional): cast floating-point tensors to it.
        overwrite (`bool`): replace an existing non-empty `output`.
        max_shard_size (`int` or `str`, defaults to `"5GB"`): as `save_pretrained` reads it.
        show_progress (`bool`, defaults to `True`): a progress bar with the bytes read and written.
        description (`str`): the progress bar's label.
        tokenizer, generation_config (optional): default to the source folder's (see `hf_slim.hub.read_hub_files`);
            a missing generation config is derived from the output config.
        card_kwargs (`dict`, optional): for `hf_slim.hub.render_model_card` (description, base_model, ...).
        mtp_note (`str`): the card's line about MTP layers `structure` holds in its family's own layout (see
            [`stock_export_tensors`]); the line about `mtp_structure`'s tensors is written without it.

    Raises:
        `ValueError`: a tensor whose shape does not fit `structure` (naming both), a tensor `structure` does not hold,
            one it holds that was not written, or `output` being the source folder. Nothing is left at `output`.
    """
    from tqdm.auto import tqdm

    from .hub import (
        MTP_FILE,
        add_to_index,
        mtp_card_note,
        read_hub_files,
        write_hub_files,
    )

    output = Path(output)
    parse_size(max_shard_size, "max_shard_size")
    if reader.folder is not None and output.resolve() == Path(reader.folder).resolve():
        raise ValueError(f"output={str(output)!r} is the source folder; write the new checkpoint elsewhere.")
    tied = _tied_aliases(structure)
    expected = {name: tuple(t.shape) for name, t in structure.state_dict().items() if name not in tied}
    mtp_expected = {}
    if mtp_structure is not None:
        mtp_expected = {n: tuple(t.shape) for n, t in mtp_structure.state_dict().items() if n.startswith("mtp.")}
    source_tokenizer, source_generation = read_hub_files(reader.folder, load_tokenizer=tokenizer is None)
    tokenizer = tokenizer if tokenizer is not None else source_tokenizer
    generation_config = generation_config if generation_config is not None else source_generation
    config = structure.config
    tensors = list(tensors)
    out_dtype: torch.dtype | None = None
    with atomic_directory(output, overwrite=overwrite) as tmp:
        main = ShardedCheckpointWriter(tmp, spec=get_spec(config), config=config, max_shard_size=max_shard_size)
        writers = {"": main}
        if mtp_expected:
            slim = mtp_structure.config
            writers["mtp"] = ShardedCheckpointWriter(
                tmp / ".mtp", spec=get_spec(slim), config=slim, max_shard_size=_ONE_FILE
            )
        written: set[str] = set()
        bar = tqdm(total=len(tensors), desc=description, unit="tensor", disable=not show_progress)
        try:
            for item in tensors:
                where = "mtp" if mtp_expected and item.name.startswith("mtp.") else ""
                shapes = mtp_expected if where else expected
                if item.name in tied:
                    bar.update()
                    continue
                if item.name not in shapes:
                    raise ValueError(
                        f"tensor {item.name!r} (from {item.source or item.name!r}) has no place in "
                        f"{type(structure).__name__}; the checkpoint does not fit its config."
                    )
                tensor = item.read()
                if tuple(tensor.shape) != shapes[item.name]:
                    raise ValueError(
                        f"tensor {item.name!r} (from {item.source or item.name!r}) has shape {list(tensor.shape)}, "
                        f"but {type(structure).__name__} of the new config holds {list(shapes[item.name])}."
                    )
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype) if dtype is not None else tensor
                    out_dtype = out_dtype or tensor.dtype
                writers[where].add(item.name, tensor)
                del tensor
                written.add(item.name)
                bar.update()
                done = sum(w.bytes_written for w in writers.values())
                bar.set_postfix_str(f"read {_human(reader.bytes_read)}, written {_human(done)}", refresh=False)
            missing = sorted((set(expected) | set(mtp_expected)) - written)
            if missing:
                raise ValueError(
                    f"{reader.folder or 'the source'} gives no tensor for {missing[:3]}"
                    + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                    + f" of {type(structure).__name__}; the checkpoint does not fit its config."
                )
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        finally:
            bar.close()
        if "mtp" in writers:
            (tmp / ".mtp" / "model.safetensors").rename(tmp / MTP_FILE)
            (tmp / ".mtp").rmdir()
            add_to_index(tmp, MTP_FILE, sorted(mtp_expected))
            mtp_note = mtp_card_note(mtp_structure.config.num_mtp_heads)
        # what save_pretrained records about the weights it writes
        config.architectures = [type(structure).__name__]
        config.dtype = str(out_dtype or torch.float32).removeprefix("torch.")
        if generation_config is None:
            from transformers import GenerationConfig

            generation_config = GenerationConfig.from_model_config(config)
        write_hub_files(
            structure,
            tmp,
            processing_class=tokenizer,
            generation_config=generation_config,
            repo_id=output.name,
            card_kwargs=card_kwargs,
            mtp_note=mtp_note,
        )
    return output.resolve()


# ---- conversion -----------------------------------------------------------------------------------------------------
def _target_class(to: str) -> type:
    from .convert import FAMILIES

    return SlimMoeForCausalLM if to == "slim_moe" else FAMILIES[to].model_class


def _normal(shape: tuple[int, ...], std: float, dtype: torch.dtype) -> torch.Tensor:
    # drawn in float32, then cast (`from_hf` draws in the model's dtype: the same distribution, other numbers)
    return torch.empty(shape).normal_(0.0, std).to(dtype)


# what an MTP depth holds besides its decoder block (transformers' MTP layout, see docs/mtp.md)
_MTP_DEPTH_PARTS = ("enorm", "hnorm", "eh_proj", "post_norm")


def _new_mtp_tensors(reader: Reader, slim: SlimMoeConfig, structure: Any, dtype: torch.dtype) -> list[StreamedTensor]:
    """The MTP heads `from_hf(..., mtp_init="last_layer")` adds: each depth's block a copy of the last sparse decoder
    layer (read lazily, under its name in the source), its `eh_proj` drawn from normal(0, initializer_range) and its
    norms (`enorm`, `hnorm`, `post_norm`) at one."""
    from .convert import stock_name

    sparse = [i for i, kind in enumerate(slim.mlp_layer_types) if kind == "sparse"]
    if not sparse:
        raise ValueError(
            f"num_mtp_heads={slim.num_mtp_heads}: the MTP heads start as copies of the last sparse decoder layer, and "
            "this checkpoint has none."
        )
    last = f"model.layers.{sparse[-1]}."
    out = []
    for name, meta in structure.state_dict().items():
        if not name.startswith("mtp."):
            continue
        rest = name.split(".", 3)[3] if name.startswith("mtp.layers.") else ""
        if rest and rest.split(".")[0] not in _MTP_DEPTH_PARTS:  # the depth's decoder block
            source = stock_name(reader.config, last + rest)
            out.append(StreamedTensor(name, functools.partial(reader.read, source), source))
        elif name.endswith(".eh_proj.weight"):
            draw = functools.partial(_normal, tuple(meta.shape), slim.initializer_range, dtype)
            out.append(StreamedTensor(name, draw, "a new init"))
        else:  # the RMSNorm weights
            out.append(StreamedTensor(name, functools.partial(torch.ones, tuple(meta.shape), dtype=dtype), "a new init"))
    return out


def _mtp_depths_in(reader: Reader) -> int:
    """How many MTP depths (`mtp.layers.{k}.*`, transformers' MTP layout) the checkpoint holds; 0 when none."""
    depths = set()
    for name in reader.names():
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[:2] == ["mtp", "layers"] and parts[2].isdigit():
            depths.add(int(parts[2]))
    return len(depths)


def _kept_mtp_heads(reader: Reader, to: str, num_mtp_heads: int) -> tuple[int, bool]:
    """The MTP depths a stock source brings back to SlimMoe, or 0 when there is nothing to bring back, and whether
    they are in the family's own layout (GLM-4-MoE's `model.layers.{N + k}`) rather than under `mtp.layers.*` (as
    `save_for_hub(..., model_type=...)` keeps them in `mtp.safetensors` for the other families).

    Raises:
        `ValueError`: `num_mtp_heads` is neither 0 nor the number of depths the checkpoint holds.
    """
    from .convert import mtp_depths

    if to != "slim_moe" or reader.config.model_type == "slim_moe":
        return 0, False
    native = mtp_depths(reader.config, reader.names())
    found = native or _mtp_depths_in(reader)
    if found and num_mtp_heads and num_mtp_heads != found:
        where = f"after its {reader.config.num_hidden_layers} decoder layers" if native else "under `mtp.layers.*`"
        raise ValueError(
            f"num_mtp_heads={num_mtp_heads}, but {reader.folder or 'the source'} holds {found} MTP depth(s) {where}, "
            f"which the conversion keeps; pass num_mtp_heads=0 (or {found}) to keep them."
        )
    return found, bool(native)


def stock_export_tensors(
    slim: SlimMoeConfig,
    model_type: str,
    tensors: list[StreamedTensor],
    *,
    keep_mtp: bool = True,
    slim_structure: Any = None,
) -> tuple[Any, Any, list[StreamedTensor], str]:
    """What [`stream_export`] takes to write SlimMoe `tensors` (SlimMoe naming) as the stock family `model_type`.

    Each tensor takes its name in that family (`hf_slim.convert.stock_name`). MTP tensors (`mtp.*`) go, with
    `keep_mtp`, into the family's own MTP layers when it has them (GLM-4-MoE: `model.layers.{N + k}`, attached to the
    structure, plus the copies of the embedding and the head that layout holds, read as the model's own; a warning
    when transformers' `generate(use_mtp=True)` does not look at that depth), else beside the stock weights in
    `mtp.safetensors` (`slim_structure`, the SlimMoe model on the meta device, gives their shapes).

    Returns:
        `(structure, mtp_structure, tensors, mtp_note)` for `stream_export`.
    """
    from .anatomy.mtp_blocks import attach_mtp_layers
    from .convert import FAMILIES, mtp_copies, stock_config_for_export, stock_name, warn_if_mtp_hidden
    from .hub import native_mtp_card_note

    target = stock_config_for_export(slim, model_type, keep_mtp)
    structure = meta_model(target, FAMILIES[model_type].model_class)
    copies = mtp_copies(target)
    kept = [t for t in tensors if keep_mtp or not t.name.startswith("mtp.")]
    out = [StreamedTensor(stock_name(target, t.name), t.read, t.source) for t in kept]
    if not copies:
        mtp_structure = slim_structure if keep_mtp and slim.num_mtp_heads else None
        return structure, mtp_structure, out, ""
    by_name = {t.name: t for t in tensors}
    out += [StreamedTensor(copy, by_name[name].read, by_name[name].source) for copy, name in copies.items()]
    attach_mtp_layers(structure, [t.name for t in out])
    warn_if_mtp_hidden(target)
    return structure, None, out, native_mtp_card_note(target)


def convert_checkpoint(
    source: str | os.PathLike | Reader,
    output: str | os.PathLike,
    *,
    to: str = "slim_moe",
    num_mtp_heads: int = 0,
    keep_mtp: bool = True,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    show_progress: bool = True,
    tokenizer: Any = None,
    card_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Convert a checkpoint on disk between a stock MoE family and SlimMoe, one tensor at a time.

    The output is what `save_for_hub(from_hf(model, num_mtp_heads))` (to SlimMoe) or `save_for_hub(slim,
    model_type=to, keep_mtp=keep_mtp)` (to a stock family) writes for the loaded model: the same weights (bitwise,
    in the stored dtype unless `dtype` is given), config, generation config, tokenizer and model card, written
    atomically. The config is translated through the family's anatomy spec (`to_slim_moe` / `from_slim_moe`); every
    tensor keeps its model name (but for the renames a spec declares, `hf_slim.convert.tensor_name`) and is written in
    the target family's stored layout (Mixtral's `block_sparse_moe`, per-expert tensors for the stock families, fused
    ones for SlimMoe). A stock checkpoint converts to another stock family through SlimMoe, as the command line does
    (MTP layers are left out of that). GLM-4-MoE's MTP layers (`model.layers.{N + k}`) are SlimMoe's MTP heads
    (`mtp.layers.{k}`) both ways (see `docs/mtp.md`).

    Args:
        source: a checkpoint folder, a Hub model id (see `hf_slim.checkpoints.open_checkpoint`), or an open reader.
        output: the output folder.
        to (`str`, defaults to `"slim_moe"`): `"slim_moe"` or a stock family of `hf_slim.convert.SUPPORTED_MODEL_TYPES`.
        num_mtp_heads (`int`, defaults to 0): MTP depths to add when converting a stock checkpoint to SlimMoe; each
            starts as `from_hf(..., mtp_init="last_layer")` starts it: its block a copy of the last sparse decoder
            layer, `eh_proj` freshly drawn from normal(0, `initializer_range`), the norms at one. A stock source that
            holds MTP depths (`mtp.layers.{k}.*`, as `save_for_hub(slim, model_type=...)` and this function keep
            them in `mtp.safetensors`), or GLM-4-MoE MTP layers after its decoder layers, converts to SlimMoe with
            those depths: `num_mtp_heads` becomes their number and their tensors are copied (their shapes must be
            what the SlimMoe config builds).
        keep_mtp (`bool`, defaults to `True`): converting SlimMoe to a stock family, keep the MTP tensors as `mtp.*`
            in `mtp.safetensors` (listed in the index), which stock transformers skips; for `glm4_moe`, as its own MTP
            layers (`model.layers.{N + k}`, with the copies of the embedding and the head), which stock
            `generate(use_mtp=True)` drafts with when `N` is 46 or 92 (a warning says so otherwise).
        dtype (`torch.dtype` or `str`, optional): cast floating-point tensors to it (e.g. `"bfloat16"`).
        overwrite (`bool`): replace an existing non-empty `output`.
        max_shard_size (`int` or `str`, defaults to `"5GB"`): shard size of the output, as `save_pretrained` reads it.
        show_progress (`bool`, defaults to `True`): a progress bar with the bytes read and written.
        tokenizer (optional): saved into the folder; by default the source folder's tokenizer, if it has one.
        card_kwargs (`dict`, optional): for `hf_slim.hub.render_model_card` (description, base_model, ...); by
            default `base_model` is `source` (a reader's folder: a local folder names its Hub model itself, see
            `hf_slim.hub.card_metadata`) and `base_model_relation` is `"convert"`.

    Returns:
        The output folder.

    Raises:
        `ValueError`: an unknown `to` or source family, a bad `num_mtp_heads` (see
            `hf_slim.convert.conversion_configs`; a non-zero one other than the number of MTP depths a stock source
            holds), an MTP tensor whose shape is not the SlimMoe config's (naming both), a SlimMoe field the target
            family cannot hold (naming it), a bogus `dtype` or `max_shard_size`; `hf_slim.checkpoints.CheckpointError` for a checkpoint that cannot be read;
            `FileExistsError` when `output` exists and `overwrite` is not set. Nothing is left at `output` on failure.

    Example:
        ```python
        >>> convert_checkpoint("Qwen/Qwen3-30B-A3B", "qwen3-slim", num_mtp_heads=1)
        >>> convert_checkpoint("qwen3-slim", "qwen3-back", to="qwen3_moe")
        ```
    """
    from .anatomy.mtp_blocks import attach_mtp_layers
    from .convert import conversion_configs, slim_name

    cast = parse_dtype(dtype)
    parse_size(max_shard_size, "max_shard_size")
    with open_source(source, lambda config: conversion_configs(config, to, num_mtp_heads)) as (reader, configs):
        kept_mtp, native = _kept_mtp_heads(reader, to, num_mtp_heads)
        if kept_mtp and kept_mtp != num_mtp_heads:
            slim, target = conversion_configs(reader.config, to, kept_mtp)
        else:
            slim, target = configs
        source_structure = meta_model(reader.config, _target_class(reader.config.model_type))
        if native:  # MTP layers after the decoder layers (GLM-4-MoE): they become the SlimMoe heads
            attach_mtp_layers(source_structure, reader.names())
        # a stock source's `mtp.layers.*` (a stock export of SlimMoe) are copied into the SlimMoe heads, whose shapes
        # `stream_export` checks against the SlimMoe config
        also = {name for name in reader.names() if name.startswith("mtp.layers.")} if kept_mtp and not native else set()
        # every tensor under its SlimMoe name (the MTP layers' copies of the embedding and the head have none)
        tensors = [
            StreamedTensor(new, functools.partial(reader.read, name), name)
            for name in held_tensors(reader, source_structure, also=also)
            if (new := slim_name(reader.config, name)) is not None
        ]
        mtp_structure, mtp_note = None, ""
        if to == "slim_moe":
            structure = meta_model(target, SlimMoeForCausalLM)
            if reader.config.model_type != "slim_moe" and slim.num_mtp_heads and not kept_mtp:
                floating = next(reader.dtype(t.source) for t in tensors if reader.dtype(t.source).is_floating_point)
                tensors += _new_mtp_tensors(reader, slim, structure, cast or floating)
        else:
            structure, mtp_structure, tensors, mtp_note = stock_export_tensors(
                slim, to, tensors, keep_mtp=keep_mtp, slim_structure=source_structure
            )
        what = "SlimMoe" if to == "slim_moe" else to
        named = reader.folder if isinstance(source, (CheckpointReader, StateDictReader)) else source
        card_kwargs = {"base_model": str(named) if named is not None else None, "base_model_relation": "convert",
                       **(card_kwargs or {})}  # fmt: skip
        return stream_export(
            reader,
            output,
            tensors,
            structure=structure,
            mtp_structure=mtp_structure,
            mtp_note=mtp_note,
            dtype=cast,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            show_progress=show_progress,
            description=f"converting to {what}",
            tokenizer=tokenizer,
            card_kwargs=card_kwargs,
        )
