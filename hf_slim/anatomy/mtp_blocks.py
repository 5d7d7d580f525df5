"""MTP layers that a family's checkpoints store after its decoder layers (GLM-4-MoE, DeepSeek-V3).

These checkpoints hold `num_nextn_predict_layers` multi-token-prediction layers as `model.layers.{N + k}`
(`N = num_hidden_layers`): a decoder block (always with routed experts) plus `enorm`, `hnorm`, `eh_proj` and
`shared_head.norm` (DeepSeek-V3 also ships `embed_tokens` and `shared_head.head`, copies of the model's own).
transformers' model classes do not build them: the forward runs `layers[:num_hidden_layers]`, `from_pretrained` skips
them, and `generate(use_mtp=True)` loads them separately (`transformers.modeling_layers.MtpModel`).

hf-slim gives them a place in the model instead: [`attach_mtp_layers`] appends them to the decoder container, their
weights held as buffers, so they ride along in `state_dict()` (`save_pretrained` writes them back where they were,
one tensor per expert) without being parameters of the model (not counted, not trained). Every block rule of the
family then applies to them as to a decoder block; a `layer` selection keeps them only where it lists them, after
the kept decoder layers, which renumbers them to follow those layers, and `num_nextn_predict_layers` follows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["TrailingMtp", "attach_mtp_layers", "detach_mtp_layers", "mtp_blocks", "select_mtp_layers"]


@dataclass(frozen=True)
class TrailingMtp:
    """How a family stores MTP layers after its decoder layers (the `trailing_mtp` field of [`ArchSpec`]).

    Args:
        count_field (`str`, defaults to `"num_nextn_predict_layers"`): the config attribute holding their number.
        norms (`tuple[str, ...]`): RMSNorms of hidden size each layer holds beside its decoder block.
        optional (`tuple[str, ...]`): modules some checkpoints ship in each layer (DeepSeek-V3's and GLM-4.5's
            copies of the embedding and the head, in that order); built only where the checkpoint holds them.
        post_norm (`str`): the norm of `norms` applied to the block's output, transformers' `MtpLayer.post_norm`
            (SlimMoe's `mtp.layers.{k}.post_norm`).
    """

    count_field: str = "num_nextn_predict_layers"
    norms: tuple[str, ...] = ("enorm", "hnorm", "shared_head.norm")
    optional: tuple[str, ...] = ("embed_tokens", "shared_head.head")
    post_norm: str = "shared_head.norm"

    def count(self, config: Any) -> int:
        """The number of MTP layers `config` declares."""
        return int(getattr(config, self.count_field, 0) or 0)


def _container(spec: Any) -> str:
    return spec.block_containers[0]


def mtp_blocks(spec: Any, config: Any, names: Iterable[str] | None = None) -> list[str]:
    """Block prefixes of the MTP layers `config` declares (`model.layers.{N + k}`); with `names` (tensor names of a
    checkpoint or state dict) only the leading depths that have tensors there."""
    mtp = getattr(spec, "trailing_mtp", None)
    if mtp is None:
        return []
    n, out = config.num_hidden_layers, []
    present = None if names is None else {spec.split_name(name)[0] for name in names}
    for k in range(mtp.count(config)):
        block = f"{_container(spec)}.{n + k}"
        if present is not None and block not in present:
            break
        out.append(block)
    return out


def _as_buffers(module: nn.Module) -> None:
    """Hold every parameter of `module` as a (persistent) buffer: in `state_dict()`, not in `parameters()`."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, param.data)


def _build(model: Any, spec: Any, k: int, block: str, names: set[str] | None) -> nn.Module:
    config = model.config
    layers = model.get_submodule(_container(spec))
    mtp_config = config.get_mtp_config()  # the config transformers builds MTP layers with (every layer sparse)
    layer = type(layers[0])(mtp_config, k)
    norm = type(layers[0].input_layernorm)
    hidden = config.hidden_size
    for path in spec.trailing_mtp.norms:
        parent, _, leaf = path.rpartition(".")
        owner = layer
        if parent:
            if not hasattr(layer, parent):
                setattr(layer, parent, nn.Module())
            owner = getattr(layer, parent)
        setattr(owner, leaf, norm(hidden, eps=config.rms_norm_eps))
    layer.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
    for path in spec.trailing_mtp.optional:
        if names is None or f"{block}.{path}.weight" not in names:
            continue
        parent, _, leaf = path.rpartition(".")
        owner = getattr(layer, parent) if parent else layer
        module = (
            nn.Embedding(config.vocab_size, hidden)
            if leaf == "embed_tokens"
            else nn.Linear(hidden, config.vocab_size, bias=False)
        )
        setattr(owner, leaf, module)
    _as_buffers(layer)
    return layer


def attach_mtp_layers(model: Any, names: Iterable[str], *, spec: Any = None) -> list[str]:
    """Append the MTP layers that `names` hold to `model`'s decoder container, on the meta device (weights as
    buffers; load them with `load_state_dict(..., assign=True)`). A model holding them already is left as it is.

    Args:
        model ([`~transformers.PreTrainedModel`]): a causal LM whose family stores MTP layers after its decoder layers.
        names (`Iterable[str]`): tensor names of the checkpoint or state dict the layers come from (model naming);
            only the depths with tensors there are built, and the optional modules they hold.
        spec ([`ArchSpec`], optional): defaults to the family's registered spec.

    Returns:
        `list[str]`: the block prefixes of the MTP layers the model holds now (empty for other families).
    """
    from .registry import get_spec

    spec = spec or get_spec(model)
    if getattr(spec, "trailing_mtp", None) is None:
        return []
    layers = model.get_submodule(_container(spec))
    n = model.config.num_hidden_layers
    if len(layers) > n:
        return [f"{_container(spec)}.{i}" for i in range(n, len(layers))]
    names = set(names)
    blocks = mtp_blocks(spec, model.config, names)
    with torch.device("meta"):
        for k, block in enumerate(blocks):
            layers.append(_build(model, spec, k, block, names))
    return blocks


def detach_mtp_layers(model: Any, *, spec: Any = None) -> None:
    """Remove MTP layers [`attach_mtp_layers`] appended (the model's forward never ran them)."""
    from .registry import get_spec

    spec = spec or get_spec(model)
    if getattr(spec, "trailing_mtp", None) is None:
        return
    layers = model.get_submodule(_container(spec))
    while len(layers) > model.config.num_hidden_layers:
        del layers[len(layers) - 1]


def select_mtp_layers(spec: Any, config: Any, new: Any, kept: list[int]) -> None:
    """Config follow-up of a `layer` selection for a family with trailing MTP layers: `kept` may list the MTP layers
    (`N + k`) after the decoder layers, in depth order from the first; `new`'s MTP count becomes how many it lists.

    Raises:
        `ValueError`: MTP layers listed out of depth order, before a decoder layer, or without their first depth.
    """
    mtp = getattr(spec, "trailing_mtp", None)
    if mtp is None:
        return
    n = config.num_hidden_layers
    listed = [i for i in kept if i >= n]
    decoder = [i for i in kept if i < n]
    if listed and (kept[len(decoder):] != listed or listed != list(range(n, n + len(listed)))):
        raise ValueError(
            f"layer: MTP layers {listed} must follow the kept decoder layers in depth order from {n} (each depth "
            f"drafts from the one before), got {kept}"
        )
    new.num_hidden_layers = len(decoder)
    setattr(new, mtp.count_field, len(listed))
