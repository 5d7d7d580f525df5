"""Axes spec for `mixtral`: every layer sparse, experts counted by `num_local_experts`, expert width by
`intermediate_size`."""

from typing import Any

from ._rules import moe_spec
from ._slim_moe_fields import all_sparse, common_in, common_out, require, uniform_window


def _to_slim_moe(config: Any) -> dict:
    return {
        **common_in(config),
        "num_experts": config.num_local_experts,
        "moe_intermediate_size": config.intermediate_size,
        "norm_topk_prob": True,
        "qk_norm": None,
        "sliding_window": config.sliding_window,
    }


def _from_slim_moe(config: Any) -> dict:
    model_type = "mixtral"
    all_sparse(config, model_type)
    require(config, model_type, "qk_norm", (None,), "Mixtral has no q/k norm")
    require(config, model_type, "clip_qkv", (None,), "Mixtral does not clip q/k/v")
    require(config, model_type, "attention_bias", (False,), "Mixtral has no attention biases")
    require(config, model_type, "attention_output_bias", (False,), "Mixtral has no attention biases")
    require(config, model_type, "norm_topk_prob", (True,), "Mixtral always renormalises the top-k weights")
    return {
        **common_out(config),
        "num_local_experts": config.num_experts,
        "intermediate_size": config.moe_intermediate_size,
        "sliding_window": uniform_window(config, model_type),
    }


SPEC = moe_spec(
    "mixtral",
    config_fields={"num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size"},
    to_slim_moe=_to_slim_moe,
    from_slim_moe=_from_slim_moe,
)
