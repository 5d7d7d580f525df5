"""Axes spec for `qwen3_next` (Qwen3-Next): hybrid Gated DeltaNet / gated full attention, shared expert,
RMSNorm of the form x*(1+w) (selecting entries of w is still exact).

Gated attention's `q_proj` holds `[query, gate]` per head (2 * head_dim rows per head). Gated DeltaNet heads are not
an axis here; its in/out projections follow the hidden axis. `layer_types` follows the layer axis.
"""

from ._rules import (
    DEFAULT_MODULES,
    attention_rules,
    decoder_norm_rules,
    dense_mlp_rules,
    embedding_rules,
    head_dim_units,
    qwen_sparse_layout_hook,
    router_expert_rules,
    rule,
    shared_expert_rules,
)
from .core import ArchSpec, Dim

_linear_attention = (
    rule("linear_attn.in_proj_qkvz.weight", Dim("hidden", 1)),
    rule("linear_attn.in_proj_ba.weight", Dim("hidden", 1)),
    rule("linear_attn.out_proj.weight", Dim("hidden", 0)),
)

SPEC = ArchSpec(
    model_type="qwen3_next",
    global_rules=embedding_rules(),
    block_rules=decoder_norm_rules()
    + attention_rules(q_unit="head_dim_x2")
    + _linear_attention
    + router_expert_rules()
    + shared_expert_rules()
    + dense_mlp_rules(),
    config_fields={},
    units=head_dim_units,
    modules=DEFAULT_MODULES,
    layer_list_fields=("layer_types",),
    config_hook=qwen_sparse_layout_hook,
)
