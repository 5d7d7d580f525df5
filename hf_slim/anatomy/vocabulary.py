"""The one axis / size vocabulary: which axes exist and which canonical config field holds each axis's size.

Sizes are named as config fields in the canonical (Qwen3-MoE) spelling; an [`ArchSpec`] maps them to a family's
own attribute (`spec.field("num_experts")` is Mixtral's `num_local_experts`). Every list of size fields in hf-slim
(pruning targets, the sizes statistics remember, what a selection changes in a config, the elastic variant fields)
is derived from the table here. The SlimMoe family files ship as remote code and keep their own copy
(`ELASTIC_FIELDS`); a test checks that copy against this table.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AXES",
    "PER_LAYER_AXES",
    "SELECTABLE_AXES",
    "SizeField",
    "SIZES",
    "SIZE_FIELDS",
    "AXIS_SIZE_FIELDS",
    "NESTED_SIZE_FIELDS",
    "SIZE_FIELD_OF_AXIS",
    "PER_LAYER_SIZE_FIELD_OF_AXIS",
]

#: Every axis a spec may name. `kv_head` is derived from `head` (KV-group aware) and never selected directly.
AXES = ("layer", "hidden", "head", "kv_head", "expert", "expert_ffn", "shared_ffn", "ffn")
#: Axes whose index set is chosen per block (decoder layer or MTP layer).
PER_LAYER_AXES = ("head", "kv_head", "expert", "expert_ffn", "shared_ffn", "ffn")
#: Axes a selection may name.
SELECTABLE_AXES = tuple(a for a in AXES if a != "kv_head")


@dataclass(frozen=True)
class SizeField:
    """One canonical size field of a config.

    Args:
        name (`str`): the config field, Qwen3-MoE spelling.
        axis (`str` or `None`): the axis whose length it is; `None` for a size that is no axis (top-k).
    """

    name: str
    axis: str | None

    @property
    def per_layer(self) -> bool:
        """Whether the axis is chosen per block (so a family may hold one size per layer)."""
        return self.axis in PER_LAYER_AXES

    @property
    def selectable(self) -> bool:
        """Whether a selection names the axis directly (`num_key_value_heads` follows the heads)."""
        return self.axis in SELECTABLE_AXES


#: Every size field, in the order user-facing tables and the `PruneConfig` fields list them.
SIZES = (
    SizeField("num_hidden_layers", "layer"),
    SizeField("hidden_size", "hidden"),
    SizeField("num_attention_heads", "head"),
    SizeField("num_key_value_heads", "kv_head"),
    SizeField("moe_intermediate_size", "expert_ffn"),
    SizeField("shared_expert_intermediate_size", "shared_ffn"),
    SizeField("intermediate_size", "ffn"),
    SizeField("num_experts", "expert"),
    SizeField("num_experts_per_tok", None),
)
#: Every size field a model can be pruned to (and an elastic variant may set).
SIZE_FIELDS = tuple(f.name for f in SIZES)
#: The size fields that measure an axis (everything but top-k): what a model's shape is.
AXIS_SIZE_FIELDS = tuple(f.name for f in SIZES if f.axis is not None)
#: The sizes of selectable axes: what has to shrink monotonically for variants to nest.
NESTED_SIZE_FIELDS = tuple(f.name for f in SIZES if f.selectable)
#: Axis -> the canonical field holding its size.
SIZE_FIELD_OF_AXIS = {f.axis: f.name for f in SIZES if f.axis is not None}
#: Per-layer selectable axis -> the canonical field holding its size (what a per-layer selection changes).
PER_LAYER_SIZE_FIELD_OF_AXIS = {f.axis: f.name for f in SIZES if f.per_layer and f.selectable}
