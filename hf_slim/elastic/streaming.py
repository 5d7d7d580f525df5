"""Nesting and slicing checkpoints on disk, one tensor at a time: the full model is never in memory.

[`make_elastic_checkpoint`] applies [`make_elastic`]'s importance permutation, and [`slice_checkpoint`] cuts one
nested variant out, reading each tensor (only the variant's prefix of it, for a slice) from the checkpoint and
writing it to the output's shards. Both plan on the model's structure alone, a model built on the meta device from
the checkpoint's config: the permutation needs only that and the calibration statistics, a variant's prefix
selection only that ([`variant_selection`]). The folders are written by `hf_slim.convert_streaming.stream_export`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from ..anatomy import (
    check_coverage,
    normalize_selection,
    renamed,
    select_config,
    tensor_index,
)
from ..checkpoints import CheckpointReader, StateDictReader
from ..convert_streaming import (
    StreamedTensor,
    held_tensors,
    meta_model,
    open_source,
    parse_dtype,
    read_bounded,
    stock_export_tensors,
    stream_export,
)
from ..models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM
from ..utils import parse_size
from .config import ElasticConfig
from .nesting import elastic_plan, variant_selection

__all__ = ["check_elastic_source", "make_elastic_checkpoint", "slice_checkpoint"]

Reader = CheckpointReader | StateDictReader


def _require_slim_moe(config: Any, what: str) -> SlimMoeConfig:
    model_type = getattr(config, "model_type", None)
    if model_type != "slim_moe":
        raise ValueError(
            f"{what} needs a SlimMoe checkpoint, but the source's config.json has model_type={model_type!r}; convert "
            "it first with hf_slim.convert_checkpoint (hf-slim convert)."
        )
    return config


def check_elastic_source(config: Any, variant: str, model_type: str | None = None) -> SlimMoeConfig:
    """The config of variant `variant` of the elastic SlimMoe checkpoint whose config is `config`, after checking
    that the variant can be sliced (and written as the stock family `model_type`, when given).

    [`slice_checkpoint`] calls it before reading any weight; the command line calls it before fetching any.

    Raises:
        `ValueError`: `config` is not SlimMoe or has no elastic variants; `model_type` is not a convertible family, or
            cannot hold the variant (naming the field). `KeyError`: `variant` is not one of the variants (listing
            them).
    """
    from ..convert import hf_config_from_slim

    target = _stock_target(model_type)
    sliced = _require_slim_moe(config, "slicing a variant").variant_config(variant)
    if target is not None:
        if isinstance(sliced.moe_intermediate_size, list):
            raise ValueError(
                f"model_type={target!r}: variant {variant!r} has per-layer moe_intermediate_size="
                f"{sliced.moe_intermediate_size}, but stock families hold one expert width for every layer; slice it "
                "without model_type (SlimMoe with remote code)."
            )
        hf_config_from_slim(sliced, target)
    return sliced


def _stock_target(model_type: str | None) -> str | None:
    from ..convert import SUPPORTED_MODEL_TYPES

    if model_type in (None, "slim_moe"):
        return None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not a family hf_slim converts to; valid values: slim_moe, "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return model_type


def _read_selected(reader: Reader, name: str, selection: dict[str, Any]) -> torch.Tensor:
    index = tensor_index(reader.spec, name, reader.shape(name), reader.config, selection)
    return read_bounded(reader, name, index)


def _derived_from(source: Any, reader: Reader, derivation: str) -> dict[str, Any]:
    """The card's default `base_model` (`source`, or an open reader's folder: a local folder names its Hub model
    itself, see `hf_slim.hub.card_metadata`) and `base_model_relation` (an hf-slim derivation)."""
    named = reader.folder if isinstance(source, (CheckpointReader, StateDictReader)) else source
    return {"base_model": str(named) if named is not None else None, "base_model_relation": derivation}


def slice_checkpoint(
    source: str | os.PathLike | Reader,
    variant: str,
    output: str | os.PathLike,
    *,
    model_type: str | None = None,
    keep_mtp: bool = True,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    show_progress: bool = True,
    tokenizer: Any = None,
    card_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write one nested variant of an elastic SlimMoe checkpoint as a standalone Hub-ready folder, tensor by tensor.

    The output is what `save_for_hub(SlimMoeForCausalLM.from_pretrained(source, elastic_variant=variant), output,
    model_type=model_type, keep_mtp=keep_mtp)` writes: the same weights (bitwise, in the stored dtype unless `dtype`
    is given), config (`config.variant_config(variant)`: still elastic over the variants nested inside), generation
    config, tokenizer and model card; SlimMoe with its modeling code and `auto_map`, or, with `model_type`, that
    stock family with the MTP tensors kept in `mtp.safetensors` (for `glm4_moe`, in its own MTP layers, see
    `hf_slim.convert_streaming.stock_export_tensors`). Only the variant's prefix of each tensor is read.

    Args:
        source: an elastic SlimMoe checkpoint: a folder, a Hub model id (see `hf_slim.checkpoints.open_checkpoint`),
            or an open reader.
        variant (`str`): a variant name from the config's `elastic` (or `"full"`).
        output: the output folder.
        model_type (`str`, optional): write the variant as this stock family (e.g. `"qwen3_moe"`), where it can hold
            it; `None` or `"slim_moe"` keeps SlimMoe.
        keep_mtp (`bool`, defaults to `True`): with `model_type`, keep the MTP tensors as `mtp.*` in
            `mtp.safetensors` (listed in the index), which stock transformers skips.
        dtype (`torch.dtype` or `str`, optional): cast floating-point tensors to it (e.g. `"bfloat16"`).
        overwrite (`bool`): replace an existing non-empty `output`.
        max_shard_size (`int` or `str`, defaults to `"5GB"`): shard size of the output, as `save_pretrained` reads it.
        show_progress (`bool`, defaults to `True`): a progress bar with the bytes read and written.
        tokenizer (optional): saved into the folder; by default the source folder's tokenizer, if it has one.
        card_kwargs (`dict`, optional): for `hf_slim.hub.render_model_card` (description, base_model, ...); by
            default `base_model` is `source` (a reader's folder) and `base_model_relation` says how it was derived.

    Returns:
        The output folder.

    Raises:
        `KeyError`: an unknown variant (listing the variants). `ValueError`: a source that is not an elastic SlimMoe
            checkpoint, a variant the stock family cannot hold (naming the field), a bogus `model_type`, `dtype` or
            `max_shard_size`; `hf_slim.checkpoints.CheckpointError` for a checkpoint that cannot be read;
            `FileExistsError` when `output` exists and `overwrite` is not set. Nothing is left at `output` on failure.

    Example:
        ```python
        >>> slice_checkpoint("my-elastic-moe", "small", "my-moe-small")
        >>> slice_checkpoint("my-elastic-moe", "small", "my-moe-small-qwen3", model_type="qwen3_moe")
        ```
    """
    target = _stock_target(model_type)
    cast = parse_dtype(dtype)
    parse_size(max_shard_size, "max_shard_size")
    with open_source(source, lambda config: check_elastic_source(config, variant, target)) as (reader, sliced):
        config = reader.config
        full = meta_model(config, SlimMoeForCausalLM)
        spec = reader.spec
        selection, updates, dropped = variant_selection(full, variant)
        sel = normalize_selection(spec, selection)
        names = [n for n in held_tensors(reader, full) if not any(d in f".{n}" for d in dropped)]
        check_coverage(spec, config, names, sel)
        select_config(spec, config, sel, updates)  # the checks apply_selection makes
        slim_structure = meta_model(sliced, SlimMoeForCausalLM)
        tensors = []
        for name in names:
            index = tensor_index(spec, name, reader.shape(name), config, sel)
            if index is None or target is not None and name.startswith("mtp.") and not keep_mtp:
                continue  # a layer the variant drops, or MTP tensors left out of a stock export
            read = functools.partial(read_bounded, reader, name, index)
            tensors.append(StreamedTensor(renamed(spec, name, sel), read, name))
        if card_kwargs is None:
            where = reader.folder or "a state dict" if isinstance(source, (CheckpointReader, StateDictReader)) else source
            card_kwargs = {"description": f"Variant `{variant}` sliced out of the elastic checkpoint `{where}`."}
        card_kwargs = {**_derived_from(source, reader, "slice"), **card_kwargs}
        structure, mtp_structure, mtp_note = slim_structure, None, ""
        if target is not None:  # the stock family's names, and its place for the MTP tensors
            structure, mtp_structure, tensors, mtp_note = stock_export_tensors(
                sliced, target, tensors, keep_mtp=keep_mtp, slim_structure=slim_structure
            )
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
            description=f"slicing {variant}",
            tokenizer=tokenizer,
            card_kwargs=card_kwargs,
        )


def make_elastic_checkpoint(
    source: str | os.PathLike | Reader,
    output: str | os.PathLike,
    variants: ElasticConfig | dict[str, Any],
    statistics: Any,
    *,
    layer_method: str = "last",
    hidden_method: str = "slimqwen",
    expert_method: str = "reap",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    show_progress: bool = True,
    tokenizer: Any = None,
    card_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Reorder a SlimMoe checkpoint on disk by importance so that every variant is a prefix, tensor by tensor.

    The output is what `save_for_hub(make_elastic(model, variants, statistics, ...))` writes for the loaded model:
    the same weights (bitwise, in the stored dtype unless `dtype` is given), config (with `elastic` set to the
    resolved variants), generation config, tokenizer, model card and modeling code. The permutation is planned from
    the statistics and the model's structure on the meta device (`hf_slim.elastic.elastic_plan`), then applied to
    each tensor as it is read.

    Args:
        source: a SlimMoe checkpoint: a folder, a Hub model id (see `hf_slim.checkpoints.open_checkpoint`), or an open
            reader.
        output: the output folder.
        variants ([`ElasticConfig`] or `dict`): the nested variants.
        statistics ([`hf_slim.pruning.ImportanceStats`]): calibration statistics of the source model (from
            `collect_statistics` on the loaded model, or its layer-by-layer variant).
        layer_method, hidden_method, expert_method (`str`): as in [`make_elastic`].
        dtype (`torch.dtype` or `str`, optional): cast floating-point tensors to it (e.g. `"bfloat16"`).
        overwrite (`bool`): replace an existing non-empty `output`.
        max_shard_size (`int` or `str`, defaults to `"5GB"`): shard size of the output, as `save_pretrained` reads it.
        show_progress (`bool`, defaults to `True`): a progress bar with the bytes read and written.
        tokenizer (optional): saved into the folder; by default the source folder's tokenizer, if it has one.
        card_kwargs (`dict`, optional): for `hf_slim.hub.render_model_card` (description, base_model, ...); by
            default `base_model` is `source` (a reader's folder) and `base_model_relation` says how it was derived.

    Returns:
        The output folder.

    Raises:
        `ValueError`: a source that is not SlimMoe, no statistics or statistics of another model, invalid or
            non-nested variants (naming the variant and the axis), a bogus method, `dtype` or `max_shard_size`;
            `hf_slim.checkpoints.CheckpointError` for a checkpoint that cannot be read; `FileExistsError` when
            `output` exists and `overwrite` is not set. Nothing is left at `output` on failure.

    Example:
        ```python
        >>> stats = ImportanceStats.load("moe-stats.safetensors")
        >>> make_elastic_checkpoint("my-moe", "my-elastic-moe", {"small": {"num_experts": 32}}, stats)
        ```
    """
    cast = parse_dtype(dtype)
    parse_size(max_shard_size, "max_shard_size")
    with open_source(source, lambda config: _require_slim_moe(config, "make_elastic_checkpoint")) as (reader, config):
        spec = reader.spec
        structure = meta_model(config, SlimMoeForCausalLM)
        elastic, selection = elastic_plan(
            structure,
            variants,
            statistics,
            layer_method=layer_method,
            hidden_method=hidden_method,
            expert_method=expert_method,
        )
        sel = normalize_selection(spec, selection)
        new_config = select_config(spec, config, sel)
        new_config.elastic = elastic.to_dict()
        names = held_tensors(reader, structure)
        check_coverage(spec, config, names, sel)
        # each tensor's indices are built when it is read: a per-expert neuron order is [experts, width] indices
        tensors = [
            StreamedTensor(renamed(spec, name, sel), functools.partial(_read_selected, reader, name, sel), name)
            for name in names
        ]
        return stream_export(
            reader,
            output,
            tensors,
            structure=meta_model(new_config, SlimMoeForCausalLM),
            dtype=cast,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            show_progress=show_progress,
            description="nesting checkpoint",
            tokenizer=tokenizer,
            card_kwargs={**_derived_from(source, reader, "elastic"), **(card_kwargs or {})},
        )
