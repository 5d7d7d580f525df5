"""Declarative architecture specs ("anatomy") and the one generic `select`.

Every structured operation in hf-slim is "keep an index set along an axis". An [`ArchSpec`] says, per
tensor-name pattern, which dimension carries which axis and how the config changes when an axis shrinks.
[`select_tensors`] applies a [`Selection`] to plain tensors (a state dict, or lazily read safetensors slices)
and needs no model instance; [`select`] / [`apply_selection`] do the same to a model and rebuild it as the same
(stock) class from the new config.

Index sets are ordered: a permutation of an axis goes through the same code as a pruning, which is what the
elastic nesting needs (permute by importance once, then every variant is a prefix).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .layout import IDENTITY_LAYOUT, StoredLayout
from .mtp_blocks import TrailingMtp, attach_mtp_layers, mtp_blocks, select_mtp_layers
from .registry import get_spec
from .vocabulary import (
    AXES,
    AXIS_SIZE_FIELDS,
    PER_LAYER_AXES,
    PER_LAYER_SIZE_FIELD_OF_AXIS,
)
from .vocabulary import SELECTABLE_AXES as _SELECTABLE

__all__ = [
    "AXES",
    "PER_LAYER_AXES",
    "Dim",
    "TensorRule",
    "ArchSpec",
    "Selection",
    "normalize_selection",
    "tensor_index",
    "index_tensor",
    "read_indexed",
    "contiguous_runs",
    "check_coverage",
    "select_tensors",
    "select_config",
    "prefix_selection",
    "renamed",
    "apply_selection",
    "select",
    "source_tensors",
    "kv_indices_for_heads",
    "layer_key",
]


#: A selection maps an axis to its ordered kept indices. `layer` and `hidden` take one 1-D index tensor;
#: per-layer axes take `{block: indices}` where block is a decoder-layer number or a block prefix such as
#: `"mtp.layers.0"`. `expert_ffn` may give a 2-D `[num_experts, k]` tensor (one neuron set per expert).
Selection = dict


@dataclass(frozen=True)
class Dim:
    """One dimension of a tensor that carries an axis.

    Args:
        axis (`str`): one of [`AXES`].
        dim (`int`): tensor dimension.
        unit (`int` or `str`, defaults to 1): elements per axis index along `dim` (a head spans `head_dim` rows);
            a string names a size from [`ArchSpec.units`].
        parts (`int`, defaults to 1): how many fused copies of the axis lie back to back along `dim`
            (`gate_up_proj` holds gate then up: 2; MTP `fc` input holds embedding then hidden half: 2).
    """

    axis: str
    dim: int
    unit: int | str = 1
    parts: int = 1


@dataclass(frozen=True)
class TensorRule:
    """Which dims of the tensors whose name matches `pattern` carry which axes.

    `pattern` is a regular expression matched against the full name (`re.fullmatch`); for block rules it is
    matched against the name relative to the block prefix (e.g. `mlp.experts.gate_up_proj`).
    """

    pattern: str
    dims: tuple[Dim, ...]

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


@dataclass(frozen=True)
class ArchSpec:
    """Declarative description of one architecture family.

    Args:
        model_type (`str`): the `config.model_type` it describes.
        global_rules (`tuple[TensorRule]`): rules on absolute names outside the blocks (embeddings, final norm, head).
        block_rules (`tuple[TensorRule]`): rules on names relative to a block (decoder or MTP layer).
        block_containers (`tuple[str]`): module paths whose numbered children are blocks. The first one holds the
            decoder layers (the `layer` axis); others (MTP layers) keep their numbering.
        config_fields (`dict[str, str]`): axis (or canonical field) -> this family's config attribute.
        units (`Callable[[config], dict]`): named unit sizes (`head_dim`, ...) read from a config.
        modules (`dict[str, str]`): where calibration hooks go: `decoder_norms` (comma list, block-relative),
            `final_norm`, `router`, `experts`, `attn_out`, `dense_down`, `shared_down`, `extra_norms`.
        pin_fields (`tuple[str]`): config attributes written explicitly whenever hidden/heads change, so that a
            value the modeling code would derive (`head_dim = hidden_size // num_attention_heads`) stays fixed.
        layer_list_fields (`tuple[str]`): per-layer list attributes selected along with the layer axis.
        per_layer_fields (`tuple[str]`): canonical size fields (`moe_intermediate_size`, ...) whose config attribute
            may hold one size per decoder layer. A selection keeping different sizes in different decoder layers then
            writes a list (one entry per kept layer; layers without indices keep their size) instead of raising;
            MTP-style blocks outside the decoder are left to `config_hook` / `validate`. Uniform sizes still write one
            int. Families whose configs hold one int leave it empty.
        config_hook (`Callable`, optional): `(old_config, new_config, selection)` for family-specific config rules.
        validate (`Callable`, optional): `(new_config)` raising `ValueError` when the architecture cannot hold it.
        config_rules (`Callable`, optional): `(config) -> block rules` that depend on config switches (e.g. whether
            q/k norms span all heads); checked before `block_rules`.
        to_slim_moe (`Callable`, optional): `(config) -> SlimMoeConfig kwargs` expressing this family exactly (the
            weights keep their names but for `slim_moe_renames` and trailing MTP layers); families with it are the
            ones `hf_slim.convert` supports. `from_slim_moe`: `(slim_config) -> this family's config kwargs`, raising
            `ValueError` naming a SlimMoe field the family cannot hold. `slim_moe_renames`: block-relative
            `(family prefix, SlimMoe prefix)` pairs (GLM's `mlp.shared_experts.` is SlimMoe's `mlp.shared_expert.`).
            `no_slim_moe`: for a family without them, the one sentence saying why it does not convert.
        stored_layout ([`StoredLayout`], optional): how checkpoints name and split the tensors (per-expert tensors,
            renamed modules); defaults to every name stored unchanged. `moe_spec` supplies the Qwen-style layout.
        trailing_mtp ([`TrailingMtp`], optional): MTP layers the checkpoints store after the decoder layers
            (`model.layers.{N + k}`), which the model class does not build (see `hf_slim.anatomy.mtp_blocks`).
        expert_groups (`str`, optional): config attribute holding the number of routing groups the experts form
            (DeepSeek-style `n_group`): an expert selection keeps the same number in each kept group.
    """

    model_type: str
    global_rules: tuple[TensorRule, ...]
    block_rules: tuple[TensorRule, ...]
    config_fields: Mapping[str, str]
    units: Callable[[Any], dict[str, int]]
    modules: Mapping[str, str]
    block_containers: tuple[str, ...] = ("model.layers",)
    pin_fields: tuple[str, ...] = ("head_dim",)
    layer_list_fields: tuple[str, ...] = ()
    per_layer_fields: tuple[str, ...] = ()
    config_hook: Callable[[Any, Any, dict], None] | None = None
    validate: Callable[[Any], None] | None = None
    config_rules: Callable[[Any], tuple[TensorRule, ...]] | None = None
    to_slim_moe: Callable[[Any], dict[str, Any]] | None = None
    from_slim_moe: Callable[[Any], dict[str, Any]] | None = None
    slim_moe_renames: tuple[tuple[str, str], ...] = ()
    no_slim_moe: str = ""
    stored_layout: StoredLayout = IDENTITY_LAYOUT
    trailing_mtp: TrailingMtp | None = None
    expert_groups: str | None = None
    notes: str = ""
    _block_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        alternatives = "|".join(re.escape(c) for c in self.block_containers)
        object.__setattr__(self, "_block_re", re.compile(rf"^((?:{alternatives})\.(\d+))\.(.+)$"))

    # ---- names -------------------------------------------------------------------------------------------------
    def split_name(self, name: str) -> tuple[str | None, str]:
        """Return `(block_prefix, relative_name)`; block_prefix is None for names outside the blocks."""
        m = self._block_re.match(name)
        if m is None:
            return None, name
        return m.group(1), m.group(3)

    def rule_for(self, name: str, config: Any = None) -> tuple[str | None, TensorRule | None]:
        block, rel = self.split_name(name)
        rules = self.global_rules if block is None else self.block_rules
        if block is not None and self.config_rules is not None and config is not None:
            rules = tuple(self.config_rules(config)) + rules
        for rule in rules:
            if rule.matches(rel):
                return block, rule
        return block, None

    def field(self, key: str) -> str:
        """This family's config attribute for an axis or a canonical (Qwen3-MoE) field name."""
        return self.config_fields.get(key, key)

    def axes(self) -> set[str]:
        """Every axis some tensor of this family carries."""
        return {d.axis for r in self.global_rules + self.block_rules for d in r.dims} | {"layer"}

    def is_decoder_block(self, block: str) -> bool:
        return block.rsplit(".", 1)[0] == self.block_containers[0]

    def blocks(self, model: Any) -> list[str]:
        """Every block prefix of a model instance: decoder layers first, then e.g. MTP layers, in order."""
        out = []
        for container in self.block_containers:
            try:
                mods = model.get_submodule(container)
            except AttributeError:
                continue
            out += [f"{container}.{i}" for i in range(len(mods))]
        return out


def layer_key(spec: ArchSpec, layer: int | str) -> str:
    """Normalise a block reference: `3` -> `"model.layers.3"`, prefixes pass through."""
    if isinstance(layer, bool):
        raise TypeError(f"layer must be an int or a block prefix string, got {layer!r}")
    if isinstance(layer, int):
        return f"{spec.block_containers[0]}.{layer}"
    if isinstance(layer, str) and spec._block_re.match(layer + ".x"):
        return layer
    raise ValueError(
        f"layer={layer!r} is not a decoder-layer number or a block prefix under {list(spec.block_containers)}"
    )


def _as_index(value: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.long) if not isinstance(value, torch.Tensor) else value.long()
    if t.ndim not in (1, 2):
        raise ValueError(f"{what}: indices must be 1-D (or 2-D for expert_ffn), got shape {tuple(t.shape)}")
    return t.cpu()


def normalize_selection(spec: ArchSpec, selection: Mapping[str, Any], *, layer: int | str | None = None) -> dict:
    """Validate a selection and turn block references into prefixes and index lists into long tensors."""
    out: dict[str, Any] = {}
    for axis, value in selection.items():
        if axis not in _SELECTABLE:
            raise ValueError(f"axis={axis!r} is not selectable; valid axes: {list(_SELECTABLE)}")
        if axis in ("layer", "hidden"):
            idx = _as_index(value, axis)
            if idx.ndim != 1:
                raise ValueError(f"{axis}: indices must be 1-D, got shape {tuple(idx.shape)}")
            out[axis] = idx
            continue
        if layer is not None and not isinstance(value, Mapping):
            value = {layer: value}
        if not isinstance(value, Mapping):
            raise ValueError(f"{axis} is a per-layer axis: give {{layer: indices}} or pass layer=...")
        per = {}
        for blk, idx in value.items():
            t = _as_index(idx, f"{axis}[{blk}]")
            if t.ndim == 2 and axis != "expert_ffn":
                raise ValueError(f"{axis}[{blk}]: only expert_ffn takes 2-D (per-expert) indices")
            per[layer_key(spec, blk)] = t
        out[axis] = per
    return out


def kv_indices_for_heads(q_idx: torch.Tensor, num_heads: int, num_kv_heads: int, what: str = "head") -> torch.Tensor:
    """KV heads kept by an ordered set of query heads, checking the selection respects the KV groups.

    The kept query heads, cut into consecutive chunks of `len(q_idx) / n_kv_kept`, must each come from one KV
    group, and no group may appear twice; the KV heads are then kept in chunk order. This admits pruning whole
    groups, pruning the same number of query heads inside every group, and any permutation of groups and of heads
    inside a group, which are exactly the selections that keep grouped-query attention well defined.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
    if q_idx.numel() == 0:
        raise ValueError(f"{what}: keep at least one attention head")
    if int(q_idx.min()) < 0 or int(q_idx.max()) >= num_heads or len(set(q_idx.tolist())) != q_idx.numel():
        raise ValueError(f"{what}: head indices must be distinct and in [0, {num_heads}), got {q_idx.tolist()}")
    group = num_heads // num_kv_heads
    groups = (q_idx // group).tolist()
    order: list[int] = []
    for g in groups:
        if g not in order:
            order.append(g)
    n_kv = len(order)
    if q_idx.numel() % n_kv:
        raise ValueError(
            f"{what}: {q_idx.numel()} query heads over {n_kv} KV groups is uneven; keep the same number of heads "
            f"in every kept group (num_attention_heads must be a multiple of num_key_value_heads)"
        )
    chunk = q_idx.numel() // n_kv
    for c in range(n_kv):
        part = groups[c * chunk : (c + 1) * chunk]
        if len(set(part)) != 1 or part[0] != order[c]:
            raise ValueError(
                f"{what}: query heads {q_idx.tolist()} are not grouped by KV head (group size {group}); list the "
                f"kept heads of one KV group together, {chunk} per group"
            )
    return torch.tensor(order, dtype=torch.long)


def _expand(idx: torch.Tensor, unit: int, parts: int, length: int) -> torch.Tensor:
    """Axis indices -> element indices along a tensor dim of size `length` (last dim of `idx`)."""
    n = length // (unit * parts)
    if n * unit * parts != length:
        raise ValueError(f"dimension of size {length} does not split into {parts} parts of units of {unit}")
    if idx.numel() and (int(idx.max()) >= n or int(idx.min()) < 0):
        raise ValueError(f"index {int(idx.max())} out of range for an axis of size {n}")
    within = torch.arange(unit)
    pieces = []
    for p in range(parts):
        base = p * n * unit + idx.unsqueeze(-1) * unit + within  # [..., k, unit]
        pieces.append(base.flatten(-2))
    return torch.cat(pieces, dim=-1)


def tensor_index(
    spec: ArchSpec, name: str, shape: Sequence[int], config: Any, selection: Mapping[str, Any]
) -> tuple[torch.Tensor | None, ...] | None:
    """Element indices to keep per dimension of one tensor, without a model instance.

    Args:
        spec (`ArchSpec`): the architecture.
        name (`str`): full tensor name (as in the checkpoint).
        shape (`Sequence[int]`): its full shape (e.g. from `SafetensorsFile(path).shape(name)`,
            `hf_slim.models.slim_moe.loading_slim_moe`).
        config: the source config (unit sizes such as `head_dim` come from it).
        selection (`dict`): a normalised selection (see [`normalize_selection`]); `kv_head` is derived.

    Returns:
        `None` if the tensor is dropped (its layer is not kept), else a tuple with one entry per dim: `None`
        (keep the whole dim), a 1-D index tensor, or a 2-D `[rows_after_dim0, k]` tensor for per-row gathers.
    """
    block, rule = spec.rule_for(name, config)
    if block is not None and "layer" in selection and spec.is_decoder_block(block):
        if int(block.rsplit(".", 1)[1]) not in selection["layer"].tolist():
            return None
    result: list[torch.Tensor | None] = [None] * len(shape)
    if rule is None:
        return tuple(result)
    units = spec.units(config)
    row_idx: torch.Tensor | None = None
    for d in rule.dims:
        idx = _axis_indices(spec, d.axis, block, selection, config)
        if idx is None:
            continue
        unit = units[d.unit] if isinstance(d.unit, str) else d.unit
        el = _expand(idx, unit, d.parts, shape[d.dim])
        if d.dim == 0 and el.ndim == 1:
            row_idx = el
        result[d.dim] = el
    for i, el in enumerate(result):
        if el is not None and el.ndim == 2:
            # per-expert (2-D) selections follow the rows kept along dim 0
            if i == 0:
                raise ValueError(f"{name}: a per-row selection cannot sit on dim 0")
            if row_idx is not None:
                result[i] = el[row_idx]
            if result[i].shape[0] != (shape[0] if row_idx is None else row_idx.numel()):
                raise ValueError(f"{name}: per-expert indices have {el.shape[0]} rows, the tensor has {shape[0]}")
    return tuple(result)


def _axis_indices(spec: ArchSpec, axis: str, block: str | None, selection: Mapping[str, Any], config: Any):
    if axis in ("layer", "hidden"):
        return selection.get(axis)
    if block is None:
        return None
    if axis == "kv_head":
        q = selection.get("head", {}).get(block)
        if q is None:
            return None
        return kv_indices_for_heads(
            q, config.num_attention_heads, config.num_key_value_heads, what=f"head[{block}]"
        )
    return selection.get(axis, {}).get(block)


def prefix_selection(
    spec: ArchSpec, config: Any, sizes: Mapping[str, int], tensor_names: Iterable[str] | None = None
) -> dict:
    """The selection keeping the first `sizes[field]` indices of every axis, from a config alone (no model).

    This is how a nested (elastic) variant is cut once each axis has been sorted by importance: every variant is a
    prefix. `sizes` uses canonical field names (`num_hidden_layers`, `hidden_size`, `num_attention_heads`,
    `num_key_value_heads`, `num_experts`, `moe_intermediate_size`, `shared_expert_intermediate_size`,
    `intermediate_size`). Heads: without `num_key_value_heads` every KV head stays and each group keeps its first
    `num_attention_heads / num_key_value_heads` heads; with it, the first groups are kept.

    Args:
        spec (`ArchSpec`): the architecture.
        config: the full (source) config.
        sizes (`dict[str, int]`): the variant's sizes; missing fields keep the full size.
        tensor_names (`Iterable[str]`, optional): checkpoint tensor names, to find blocks beyond the decoder layers
            (MTP layers); without them only decoder layers get per-layer indices.

    Returns:
        A selection for [`select_tensors`], [`tensor_index`] or [`apply_selection`].
    """
    known = set(AXIS_SIZE_FIELDS)
    unknown = sorted(set(sizes) - known)
    if unknown:
        raise ValueError(f"sizes: unknown field(s) {unknown}; valid fields: {sorted(known)}")
    for key, value in sizes.items():
        full = getattr(config, spec.field(key), None)
        if full is None or not isinstance(value, int) or not 1 <= value <= full:
            raise ValueError(f"{key}={value!r}: must be an int in [1, {full}] for this config")
    blocks = [f"{spec.block_containers[0]}.{i}" for i in range(config.num_hidden_layers)]
    for name in tensor_names or ():
        block, _ = spec.split_name(name)
        if block is not None and block not in blocks:
            blocks.append(block)
    sel: dict[str, Any] = {}
    if "num_hidden_layers" in sizes:
        sel["layer"] = torch.arange(sizes["num_hidden_layers"])
    if "hidden_size" in sizes:
        sel["hidden"] = torch.arange(sizes["hidden_size"])
    if "num_attention_heads" in sizes or "num_key_value_heads" in sizes:
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        heads = sizes.get("num_attention_heads", n_heads)
        kv = sizes.get("num_key_value_heads", n_kv)
        group = n_heads // n_kv
        if heads % kv or heads // kv > group:
            raise ValueError(
                f"num_attention_heads={heads} over num_key_value_heads={kv}: needs {heads / kv:g} heads per group, "
                f"groups hold {group}"
            )
        q = torch.cat([g * group + torch.arange(heads // kv) for g in range(kv)])
        sel["head"] = {b: q for b in blocks}
    for axis, canonical in PER_LAYER_SIZE_FIELD_OF_AXIS.items():
        if axis != "head" and canonical in sizes:
            sel[axis] = {b: torch.arange(sizes[canonical]) for b in blocks}
    return sel


def index_tensor(t: torch.Tensor, idx: tuple[torch.Tensor | None, ...] | None) -> torch.Tensor:
    """Apply [`tensor_index`]'s result to an in-memory tensor (1-D selects first, then per-row gathers)."""
    if idx is None:
        raise ValueError("tensor is dropped by the selection")
    out = t
    for d, el in enumerate(idx):
        if el is not None and el.ndim == 1:
            out = out.index_select(d, el.to(out.device))
    for d, el in enumerate(idx):
        if el is not None and el.ndim == 2:
            shape = [el.shape[0]] + [1] * (out.ndim - 1)
            shape[d] = el.shape[1]
            g = el.to(out.device).reshape(shape)
            expand = list(out.shape)
            expand[d] = el.shape[1]
            out = out.gather(d, g.expand(expand))
    return out.contiguous()


def contiguous_runs(idx: torch.Tensor) -> list[tuple[int, int]]:
    """Split an ordered 1-D index set into `(start, stop)` runs of consecutive indices (prefixes give few runs)."""
    runs: list[tuple[int, int]] = []
    for i in idx.tolist():
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def read_indexed(source: Any, name: str | None, idx: tuple[torch.Tensor | None, ...] | None) -> torch.Tensor:
    """Read only the selected elements of tensor `name`: [`index_tensor`] without loading the tensor whole.

    Args:
        source: a lazy reader with `shape(name)` and `read(name, runs_per_dim)` (one list of `(start, stop)` runs
            per dim, in output order), such as the SlimMoe family's byte-range reader
            `hf_slim.models.slim_moe.loading_slim_moe.SafetensorsFile` (plain file reads, nothing memory-mapped);
            or an in-memory tensor (`name` is then unused).
        name (`str`): the tensor's name in the reader.
        idx: [`tensor_index`]'s result for the tensor.

    1-D selections are read as runs of consecutive indices, so prefix selections (elastic variants) cost one read
    per run of rows; per-row (2-D) selections read their dims whole and gather in memory.
    """
    if isinstance(source, torch.Tensor):
        return index_tensor(source, idx)
    if idx is None:
        raise ValueError(f"{name}: tensor is dropped by the selection")
    shape = tuple(source.shape(name))
    runs = [
        None if d >= len(idx) or idx[d] is None or idx[d].ndim == 2 else contiguous_runs(idx[d])
        for d in range(len(shape))
    ]
    out = source.read(name, runs)
    rest = tuple(el if (el is not None and el.ndim == 2) else None for el in idx)
    if any(el is not None for el in rest):
        out = index_tensor(out, rest)
    return out


def renamed(spec: ArchSpec, name: str, selection: Mapping[str, Any]) -> str:
    """The name a kept tensor takes after a (normalised) selection: decoder layers are renumbered in kept order."""
    if "layer" not in selection:
        return name
    block, rel = spec.split_name(name)
    if block is None or not spec.is_decoder_block(block):
        return name
    old = int(block.rsplit(".", 1)[1])
    new = selection["layer"].tolist().index(old)
    return f"{spec.block_containers[0]}.{new}.{rel}"


def _block_sizes(axis: str, per: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {blk: (int(t.shape[-1]) if axis == "expert_ffn" else int(t.numel())) for blk, t in per.items()}


def _per_layer(spec: ArchSpec, axis: str, canonical: str, per: Mapping[str, torch.Tensor], config: Any) -> bool:
    """Whether the selection's sizes along `axis` go into the config as one entry per decoder layer."""
    if canonical not in spec.per_layer_fields:
        return False
    return isinstance(getattr(config, spec.field(canonical)), list) or len(set(_block_sizes(axis, per).values())) > 1


def _per_layer_size(
    spec: ArchSpec, axis: str, canonical: str, per: Mapping[str, torch.Tensor], config: Any, kept: list[int]
) -> int | list[int]:
    """One size per kept decoder layer (in kept order): the selection's, else the layer's old size; one int when
    they are all equal."""
    old = getattr(config, spec.field(canonical))
    sizes = {}
    for blk, size in _block_sizes(axis, per).items():
        if spec.is_decoder_block(blk):
            sizes[int(blk.rsplit(".", 1)[1])] = size
    widths = [sizes.get(i, old[i] if isinstance(old, list) else old) for i in kept]
    return widths[0] if len(set(widths)) == 1 else widths


def _uniform_size(spec: ArchSpec, axis: str, per: Mapping[str, torch.Tensor], config: Any) -> int:
    sizes = _block_sizes(axis, per)
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"{axis}: the config holds one size for every layer, but the selection keeps {sizes}; keep the same "
            f"number in every layer"
        )
    return next(iter(sizes.values()))


def select_config(
    spec: ArchSpec, config: Any, selection: Mapping[str, Any], updates: Mapping[str, Any] | None = None
) -> Any:
    """The config after a (normalised) selection; the input config is not modified.

    `updates` sets non-axis fields first (canonical names, e.g. `num_experts_per_tok`), so checks see them.
    """
    new = copy.deepcopy(config)
    for key, value in (updates or {}).items():
        setattr(new, spec.field(key), value)
    units = spec.units(config)
    if "hidden" in selection or "head" in selection:
        for f in spec.pin_fields:
            if f in units:
                setattr(new, f, units[f])
    if "hidden" in selection:
        setattr(new, spec.field("hidden_size"), int(selection["hidden"].numel()))
    per_layer_done: set[str] = set()
    for axis, canonical in PER_LAYER_SIZE_FIELD_OF_AXIS.items():
        per = selection.get(axis)
        if not per:
            continue
        if _per_layer(spec, axis, canonical, per, config):
            kept = selection["layer"].tolist() if "layer" in selection else list(range(config.num_hidden_layers))
            setattr(new, spec.field(canonical), _per_layer_size(spec, axis, canonical, per, config, kept))
            per_layer_done.add(canonical)
            continue
        size = _uniform_size(spec, axis, per, config)
        setattr(new, spec.field(canonical), size)
        if axis == "head":
            kv = {
                blk: kv_indices_for_heads(q, config.num_attention_heads, config.num_key_value_heads, f"head[{blk}]")
                for blk, q in per.items()
            }
            setattr(new, spec.field("num_key_value_heads"), _uniform_size(spec, "kv_head", kv, config))
        if axis == "expert":
            topk = getattr(new, spec.field("num_experts_per_tok"))
            if topk > size:
                raise ValueError(
                    f"num_experts_per_tok={topk} is larger than the {size} experts kept; lower num_experts_per_tok"
                )
    if "layer" in selection:
        kept = selection["layer"].tolist()
        n_old, n_all = config.num_hidden_layers, config.num_hidden_layers + len(mtp_blocks(spec, config))
        if not kept or len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= n_all:
            raise ValueError(f"layer: indices must be distinct and in [0, {n_all}), got {kept}")
        setattr(new, spec.field("num_hidden_layers"), len(kept))
        select_mtp_layers(spec, config, new, kept)  # MTP layers stored after the decoder layers
        for f in spec.layer_list_fields:
            val = getattr(config, f, None)
            if isinstance(val, (list, tuple)) and len(val) == n_old:
                setattr(new, f, [val[i] for i in kept if i < n_old])
        for canonical in spec.per_layer_fields:
            val = getattr(config, spec.field(canonical), None)
            if canonical not in per_layer_done and isinstance(val, list) and len(val) == n_old:
                widths = [val[i] for i in kept]
                setattr(new, spec.field(canonical), widths[0] if len(set(widths)) == 1 else widths)
    if spec.config_hook is not None:
        spec.config_hook(config, new, dict(selection))
    if spec.validate is not None:
        spec.validate(new)
    return new


def select_tensors(
    spec: ArchSpec,
    config: Any,
    tensors: Mapping[str, torch.Tensor],
    selection: Mapping[str, Any],
    updates: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Apply a selection to a name -> tensor mapping; returns the new tensors (renamed for layers) and config."""
    sel = normalize_selection(spec, selection)
    new_config = select_config(spec, config, sel, updates)
    _check_coverage(spec, config, tensors, sel)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        idx = tensor_index(spec, name, t.shape, config, sel)
        if idx is None:
            continue
        out[renamed(spec, name, sel)] = index_tensor(t, idx) if any(i is not None for i in idx) else t
    return out, new_config


def check_coverage(spec: ArchSpec, config: Any, names: Iterable[str], selection: Mapping[str, Any]) -> None:
    """Raise what [`select_tensors`] raises when a (normalised) selection leaves a block carrying a resized axis
    without indices; `names` are the source's tensor names (no tensors needed, e.g. a lazy checkpoint's)."""
    _check_coverage(spec, config, dict.fromkeys(names), selection)


def _check_coverage(spec: ArchSpec, config: Any, tensors: Mapping[str, Any], sel: Mapping[str, Any]) -> None:
    """A per-layer selection that changes a size held once in the config must give indices for every block that
    carries the axis (MTP layers included), or the rebuilt model would not fit."""
    for axis, canonical in PER_LAYER_SIZE_FIELD_OF_AXIS.items():
        per = sel.get(axis)
        if not per:
            continue
        if _per_layer(spec, axis, canonical, per, config):
            continue  # one size per layer: a block without indices keeps its own size
        size = _uniform_size(spec, axis, per, config)
        if size == getattr(config, spec.field(canonical), None):  # a size the config derives is checked too
            continue
        carriers = set()
        for name in tensors:
            block, rule = spec.rule_for(name, config)
            if block is None or rule is None or not any(d.axis == axis for d in rule.dims):
                continue
            if "layer" in sel and spec.is_decoder_block(block) and int(block.rsplit(".", 1)[1]) not in sel["layer"]:
                continue
            carriers.add(block)
        missing = sorted(carriers - set(per))
        if missing:
            raise ValueError(
                f"{axis}: the selection changes {spec.field(canonical)} to {size} but gives no indices for "
                f"{missing}; a size held once in the config needs indices for every block carrying the axis"
            )


def source_tensors(model: Any) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with real tensors: on the CPU when accelerate dispatched the model over several devices
    or offloaded modules (weights on the meta device until a hook loads them: each such module's hook loads them
    onto the CPU once, through accelerate's public `align_module_device`; other modules are only read). A model on
    one device gives its own state dict; meta tensors that no accelerate hook holds (a model built on the meta
    device) stay meta."""
    state = model.state_dict()
    if any(t.device.type == "meta" for t in state.values()):
        from accelerate.utils import align_module_device, has_offloaded_params

        for name, module in model.named_modules():
            if has_offloaded_params(module):
                with align_module_device(module, torch.device("cpu")):
                    for key, t in module.state_dict(prefix=f"{name}." if name else "").items():
                        if key in state and state[key].device.type == "meta":
                            state[key] = t
    devices = {t.device for t in state.values() if t.device.type != "meta"}
    if len(devices) <= 1 and all(t.device.type != "meta" for t in state.values()):
        return state
    return {k: t if t.device.type == "meta" else t.to("cpu") for k, t in state.items()}


def _rebuild(model: Any, tensors: dict[str, torch.Tensor], config: Any, name_map: Callable[[str], str]) -> Any:
    """Instantiate the same class from `config` on the meta device and assign the tensors; the buffers go where the
    tensors are when those share one device."""
    cls = type(model)
    with torch.device("meta"):
        new = cls(config)
    attach_mtp_layers(new, tensors)  # MTP layers stored after the decoder layers, where the tensors hold them
    missing, unexpected = new.load_state_dict(tensors, strict=False, assign=True)
    tied = {k for k in missing if any(k == t for t in _tied_names(new))}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"selection produced a state dict that does not fit {cls.__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if getattr(config, "tie_word_embeddings", False) or tied:
        new.tie_weights()
    old_buffers = dict(model.named_buffers())
    devices = {t.device for t in tensors.values()}
    target = devices.pop() if len(devices) == 1 else None
    for bname, buf in list(new.named_buffers()):
        if buf.device.type != "meta":
            continue
        src = old_buffers.get(name_map(bname))
        if src is None or src.shape != buf.shape:
            raise ValueError(f"cannot carry buffer {bname} over to the rebuilt model")
        if src.device.type == "meta" and target is not None and target.type != "meta":
            raise ValueError(
                f"{name_map(bname)} is a buffer offloaded by accelerate; load the model with offload_buffers=False "
                "(the default) or prune the checkpoint with hf_slim.pruning.prune_checkpoint"
            )
        mod_name, _, leaf = bname.rpartition(".")
        mod = new.get_submodule(mod_name) if mod_name else new
        persistent = leaf not in getattr(mod, "_non_persistent_buffers_set", set())
        mod.register_buffer(leaf, src.clone() if target is None else src.to(target, copy=True), persistent=persistent)
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


def _tied_names(model: Any) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(keys, Mapping):
        return set(keys.keys())
    return set(keys)


def apply_selection(
    model: Any,
    selection: Mapping[str, Any],
    *,
    spec: ArchSpec | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
    updates: Mapping[str, Any] | None = None,
) -> Any:
    """Apply several axes at once and return the rebuilt model (same class, new config); `model` is untouched.

    Args:
        model ([`~transformers.PreTrainedModel`]): a causal LM of a supported family.
        selection (`dict`): axis -> indices (see [`Selection`]). Indices refer to the source model.
        spec (`ArchSpec`, optional): defaults to the registered spec of `model.config.model_type`.
        tensors (`dict`, optional): source tensors to use instead of the model's own (e.g. after merging experts);
            same names and shapes. By default [`source_tensors`]: `model.state_dict()`, read through accelerate
            when the model is dispatched over several devices or offloaded.
        updates (`dict`, optional): non-axis config fields to set (canonical names, e.g. `num_experts_per_tok`).

    Returns:
        The new model, on the device of the tensors: a model on one device stays there, one dispatched over several
        devices or offloaded by accelerate comes back whole on the CPU. Keeping every index in order gives back the
        same function; a permutation of `hidden`, `head`, `expert`, `expert_ffn`, `shared_ffn` or `ffn` gives the
        same function as well.
    """
    spec = spec or get_spec(model.config)
    sel = normalize_selection(spec, selection)
    state = dict(tensors) if tensors is not None else source_tensors(model)
    new_tensors, new_config = select_tensors(spec, model.config, state, sel, updates)
    # a tensor no axis touched is the source's own: copy it, so training the new model leaves the source as it was
    shared = {t.untyped_storage().data_ptr() for t in state.values() if t.device.type != "meta"}
    new_tensors = {
        k: v.clone() if v.device.type != "meta" and v.untyped_storage().data_ptr() in shared else v
        for k, v in new_tensors.items()
    }
    inverse: dict[str, str] = {}
    if "layer" in sel:
        for name in state:
            if tensor_index(spec, name, state[name].shape, model.config, {"layer": sel["layer"]}) is not None:
                inverse[renamed(spec, name, sel)] = name
    return _rebuild(model, new_tensors, new_config, lambda n: inverse.get(n, n))


def select(
    model: Any,
    axis: str,
    indices: Any,
    layer: int | str | Iterable[int | str] | None = None,
    *,
    spec: ArchSpec | None = None,
) -> Any:
    """Keep an ordered index set along one axis and return the rebuilt model.

    Args:
        model ([`~transformers.PreTrainedModel`]): the source model (not modified).
        axis (`str`): `layer`, `hidden`, `head` (query heads, KV groups follow), `expert`, `expert_ffn`,
            `shared_ffn` or `ffn`.
        indices: kept indices in their new order. For per-layer axes either a `{layer: indices}` mapping, or one
            index set together with `layer=` (an int, a block prefix like `"mtp.layers.0"`, or several of them).
        layer: see `indices`.

    Returns:
        The new model of the same class. Sizes held once in the config (e.g. `num_experts`) must come out the same
        for every layer, so pruning a per-layer axis passes all layers in one call.

    Example:
        ```python
        >>> perm = torch.randperm(model.config.hidden_size)
        >>> same = select(model, "hidden", perm)  # identical logits
        >>> smaller = select(model, "expert", {i: [0, 2] for i in range(model.config.num_hidden_layers)})
        ```
    """
    if axis not in _SELECTABLE:
        raise ValueError(f"axis={axis!r} is not selectable; valid axes: {list(_SELECTABLE)}")
    if layer is not None and axis in ("layer", "hidden"):
        raise ValueError(f"layer= does not apply to the global axis {axis!r}")
    if layer is not None and not isinstance(layer, (int, str)):
        indices = {blk: indices for blk in layer}
    elif layer is not None:
        indices = {layer: indices}
    return apply_selection(model, {axis: indices}, spec=spec)
