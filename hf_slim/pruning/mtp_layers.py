"""MTP layers stored after the decoder layers (GLM-4-MoE, DeepSeek-V3) in calibration and pruning.

transformers' model classes of these families never hold their MTP layers (`from_pretrained` skips them,
`generate(use_mtp=True)` loads them on its own from `model.name_or_path`). So that calibration measures them and
pruning carries them, [`load_mtp_layers`] attaches them to the model from its checkpoint, the way the drafter finds
them (see `hf_slim.anatomy.mtp_blocks`: appended to `model.model.layers`, weights held as buffers, ignored by the
forward). `collect_statistics` and `prune` do it for the duration of the call (and take them off again); a pruned model
keeps the pruned MTP layers, so `save_pretrained` writes them where stock transformers reads them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..anatomy import get_spec
from ..anatomy.mtp_blocks import attach_mtp_layers, detach_mtp_layers, mtp_blocks
from ..integrations.transformers_mtp import mtp_layer_numbers, mtp_weights_found

__all__ = ["attached_mtp_blocks", "checkpoint_mtp_layers", "keep_mtp_layers", "load_mtp_layers"]


def attached_mtp_blocks(model: Any, spec: Any = None) -> list[str]:
    """Block prefixes of the MTP layers `model` holds after its decoder layers (empty for other families)."""
    spec = spec or get_spec(model)
    if getattr(spec, "trailing_mtp", None) is None:
        return []
    container = spec.block_containers[0]
    return [f"{container}.{i}" for i in range(model.config.num_hidden_layers, len(model.get_submodule(container)))]


def _on_meta(model: Any) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def load_mtp_layers(model: Any, source: str | os.PathLike | None = None) -> list[str]:
    """Attach the MTP layers of the model's checkpoint to a model whose family stores them after its decoder layers.

    Args:
        model ([`~transformers.PreTrainedModel`]): a loaded GLM-4-MoE or DeepSeek-V3 causal LM (other families are
            left alone).
        source (`str` or `os.PathLike`, optional): the checkpoint folder or Hub id; defaults to
            `model.name_or_path`, where `generate(use_mtp=True)` looks.

    Returns:
        `list[str]`: the MTP layers' block prefixes (`model.layers.{num_hidden_layers + k}`); empty when the config
        declares none or the checkpoint holds none. Their weights are read in the dtype of the matching decoder-layer
        tensors and placed with the last decoder layer.
    """
    spec = get_spec(model)
    held = attached_mtp_blocks(model, spec)
    if held or not mtp_blocks(spec, model.config):
        return held
    source = source if source is not None else getattr(model, "name_or_path", "")
    if not source:
        return []
    from ..checkpoints import CheckpointError, open_checkpoint

    try:
        reader = open_checkpoint(source)
    except CheckpointError as error:
        warnings.warn(f"MTP layers not loaded: {error}", stacklevel=2)
        return []
    container = spec.block_containers[0]
    last = model.get_submodule(f"{container}.{model.config.num_hidden_layers - 1}")
    like = last.state_dict()
    device = next((t.device for t in like.values() if t.device.type != "meta"), torch.device("cpu"))
    with reader:
        blocks = attach_mtp_layers(model, reader.names(), spec=spec)
        for block in blocks:
            module = model.get_submodule(block)
            state = {}
            for key in module.state_dict(keep_vars=True):
                tensor = reader.read(f"{block}.{key}")
                dtype = like[key].dtype if key in like else model.dtype
                state[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            module.load_state_dict(state, assign=True)
    return blocks


@contextmanager
def checkpoint_mtp_layers(model: Any) -> Iterator[list[str]]:
    """[`load_mtp_layers`] for the duration of a `with` block, for a model with real weights; the layers it attached
    are taken off again at the end (layers the model held before stay)."""
    spec = get_spec(model)
    before = attached_mtp_blocks(model, spec)
    blocks = before if before or _on_meta(model) else load_mtp_layers(model)
    try:
        yield blocks
    finally:
        if blocks and not before:
            detach_mtp_layers(model, spec=spec)


def check_stats_blocks(model: Any, spec: Any, stats: Any) -> None:
    """Raise when statistics were collected over other blocks than the model holds (MTP layers or not)."""
    have = spec.blocks(model)
    seen = (stats.metadata or {}).get("blocks") if stats is not None else None
    if seen is not None and list(seen) != have:
        raise ValueError(
            f"stats: collected over {len(seen)} blocks, the model holds {len(have)} (MTP layers "
            f"{attached_mtp_blocks(model, spec) or 'none'}); collect the statistics again on this model or checkpoint"
        )


def keep_mtp_layers(model: Any, spec: Any, kept: torch.Tensor, keep_mtp_decodable: bool) -> torch.Tensor:
    """The `layer` selection that keeps `kept` decoder layers and the model's MTP layers after them.

    Raises:
        `ValueError`: when `keep_mtp_decodable` and the source's MTP layers load with stock transformers but would
            not at the new depth (their layer numbers are fixed per family).
    """
    blocks = attached_mtp_blocks(model, spec)
    if not blocks:
        return kept
    n, n_new = model.config.num_hidden_layers, kept.numel()
    container = spec.block_containers[0]
    old = [f"{block}.enorm.weight" for block in blocks]
    new = [f"{container}.{n_new + k}.enorm.weight" for k in range(len(blocks))]
    cls = type(model)
    if keep_mtp_decodable and mtp_weights_found(cls, n, old) and not mtp_weights_found(cls, n_new, new):
        found = " or ".join(f"{container}.{i}" for i in sorted(mtp_layer_numbers(cls)))
        raise ValueError(
            f"num_hidden_layers={n_new}: {model.config.model_type}'s MTP layers would move to {container}.{n_new}, "
            f"but transformers loads them only from {found}, so generate(use_mtp=True) would fail on the pruned model; "
            f"keep num_hidden_layers={n} (widths and experts still prune) or pass keep_mtp_decodable=False"
        )
    return torch.cat([kept, torch.arange(n, n + len(blocks))])
