"""Axes spec for `qwen3_next` (Qwen3-Next): hybrid Gated DeltaNet / gated full attention, shared expert,
RMSNorm of the form x*(1+w) (selecting entries of w is still exact).

Gated attention's `q_proj` holds `[query, gate]` per head (2 * head_dim rows per head). Gated DeltaNet heads are not
an axis here; its in/out projections follow the hidden axis. `layer_types` follows the layer axis.
"""

from ._rules import attention_rules, moe_spec, qwen_sparse_layout_hook, rule
from .core import Dim

_linear_attention = (
    rule("linear_attn.in_proj_qkvz.weight", Dim("hidden", 1)),
    rule("linear_attn.in_proj_ba.weight", Dim("hidden", 1)),
    rule("linear_attn.out_proj.weight", Dim("hidden", 0)),
)

SPEC = moe_spec(
    "qwen3_next",
    attention=attention_rules(q_unit="head_dim_x2"),
    extra_block_rules=_linear_attention,
    shared_expert=True,
    dense_mlp=True,
    config_hook=qwen_sparse_layout_hook,
)
