"""Axes spec for `mixtral`: every layer sparse, experts counted by `num_local_experts`, expert width by
`intermediate_size`."""

from typing import Any

from ._rules import moe_spec
from ._slim_moe_fields import all_sparse, carried_in, carried_out, common_in, common_out, require, uniform_window
from .layout import ExpertStack, StoredLayout


#: SlimMoe fields Mixtral holds one to one, under its own names (also the spec's config fields).
_RENAMED = {"num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size"}


def _to_slim_moe(config: Any) -> dict:
    fields = {**common_in(config), **carried_in(config, tuple(_RENAMED), _RENAMED)}
    return {**fields, "norm_topk_prob": True, "qk_norm": None, "sliding_window": config.sliding_window}


def _from_slim_moe(config: Any) -> dict:
    model_type = "mixtral"
    all_sparse(config, model_type)
    require(config, model_type, "qk_norm", (None,), "Mixtral has no q/k norm")
    require(config, model_type, "clip_qkv", (None,), "Mixtral does not clip q/k/v")
    require(config, model_type, "attention_bias", (False,), "Mixtral has no attention biases")
    require(config, model_type, "attention_output_bias", (False,), "Mixtral has no attention biases")
    require(config, model_type, "norm_topk_prob", (True,), "Mixtral always renormalises the top-k weights")
    window = uniform_window(config, model_type)
    return {**common_out(config), **carried_out(config, tuple(_RENAMED), _RENAMED), "sliding_window": window}


# transformers' "mixtral" weight conversion: the MoE block is `block_sparse_moe` on disk (router included) and each
# expert holds w1 (gate), w3 (up) and w2 (down).
_STORED = StoredLayout(
    renames=(("mlp.", "block_sparse_moe."),),
    expert_stacks=(
        ExpertStack(
            "mlp.experts.gate_up_proj",
            ("block_sparse_moe.experts.{expert}.w1.weight", "block_sparse_moe.experts.{expert}.w3.weight"),
        ),
        ExpertStack("mlp.experts.down_proj", ("block_sparse_moe.experts.{expert}.w2.weight",)),
    ),
)

SPEC = moe_spec(
    "mixtral",
    config_fields=_RENAMED,
    to_slim_moe=_to_slim_moe,
    from_slim_moe=_from_slim_moe,
    stored_layout=_STORED,
)
