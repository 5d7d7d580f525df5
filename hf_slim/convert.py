"""Lossless conversion between stock transformers MoE models and SlimMoe.

All supported families store their weights under the same names (`model.layers.N.self_attn.q_proj`,
`mlp.gate`, `mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.shared_expert`, ...), so conversion is a config translation
plus a strict state-dict copy. What each family does differently (biases, q/k norms, shared expert, dense layers,
sliding windows, top-k renormalisation) is a SlimMoe config field, so the logits match the stock model exactly.
The translation of each family lives in its axes spec (`hf_slim/anatomy/<model_type>.py`: `to_slim_moe` /
`from_slim_moe`); the families here are the anatomy registry's families that have one. `conversion_configs` gives
both configs of a conversion without touching a weight; `hf_slim.convert_checkpoint` (`hf_slim/convert_streaming.py`)
converts a checkpoint on disk with it, one tensor at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import CONFIG_MAPPING, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .anatomy import get_spec, supported_model_types
from .models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM


@dataclass(frozen=True)
class _Family:
    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    to_slim: Callable[[PreTrainedConfig], dict]
    from_slim: Callable[[SlimMoeConfig], dict]


def _convertible_families() -> dict[str, _Family]:
    # One family registry (hf_slim.anatomy): a family converts when its axes spec says how its config reads as SlimMoe.
    families = {}
    for model_type in supported_model_types():
        spec = get_spec(model_type)
        if spec.to_slim_moe is None or spec.from_slim_moe is None:
            continue
        config_class = CONFIG_MAPPING[model_type]
        families[model_type] = _Family(
            config_class, MODEL_FOR_CAUSAL_LM_MAPPING[config_class], spec.to_slim_moe, spec.from_slim_moe
        )
    return families


FAMILIES: dict[str, _Family] = _convertible_families()
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))


def _family(model_type: str) -> _Family:
    if model_type not in FAMILIES:
        raise ValueError(
            f"Unsupported model_type {model_type!r}; hf_slim.convert supports {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return FAMILIES[model_type]


def slim_config_from_hf(config: PreTrainedConfig, num_mtp_heads: int = 0) -> SlimMoeConfig:
    """Translate a stock MoE config into the equivalent `SlimMoeConfig`.

    Args:
        config: A config of one of `SUPPORTED_MODEL_TYPES`.
        num_mtp_heads: Number of MTP depths to add.
    """
    fields = _family(config.model_type).to_slim(config)
    return SlimMoeConfig(**fields, num_mtp_heads=num_mtp_heads)


def hf_config_from_slim(config: SlimMoeConfig, model_type: str) -> PreTrainedConfig:
    """Translate a `SlimMoeConfig` into the stock config of `model_type`, or raise naming the field it cannot hold."""
    family = _family(model_type)
    if isinstance(config.moe_intermediate_size, list):
        raise ValueError(
            f"Cannot convert SlimMoe to {model_type!r}: config.moe_intermediate_size is a per-layer list "
            f"{config.moe_intermediate_size} but {model_type} holds one expert width for every layer."
        )
    return family.config_class(**family.from_slim(config))


def conversion_configs(
    config: PreTrainedConfig, to: str = "slim_moe", num_mtp_heads: int = 0
) -> tuple[SlimMoeConfig, PreTrainedConfig]:
    """The configs of converting a checkpoint of `config` to the family `to`, without touching any weight.

    Conversion goes through SlimMoe: a stock config is first read as the `SlimMoeConfig` expressing it exactly
    ([`slim_config_from_hf`]), which is then translated to `to` ([`hf_config_from_slim`]) unless `to` is SlimMoe.
    The weights keep their (model) names on the way.

    Args:
        config: the source config, SlimMoe or one of [`SUPPORTED_MODEL_TYPES`].
        to (`str`, defaults to `"slim_moe"`): `"slim_moe"` or one of [`SUPPORTED_MODEL_TYPES`].
        num_mtp_heads (`int`, defaults to 0): MTP depths to add; only when converting a stock config to SlimMoe.

    Returns:
        `(slim_config, target_config)`: the SlimMoe reading of `config` and the config written (the same object when
        `to` is `"slim_moe"`).

    Raises:
        `ValueError`: an unknown `to` or source family (listing the supported ones), a bad `num_mtp_heads`, or a
            SlimMoe field the target family cannot hold (naming it).
    """
    targets = ("slim_moe", *SUPPORTED_MODEL_TYPES)
    if to not in targets:
        raise ValueError(f"to={to!r} is not a family hf_slim converts to; valid values: {', '.join(targets)}.")
    if isinstance(num_mtp_heads, bool) or not isinstance(num_mtp_heads, int) or num_mtp_heads < 0:
        raise ValueError(f"num_mtp_heads={num_mtp_heads!r} must be an int >= 0.")
    source = getattr(config, "model_type", None)
    if source == "slim_moe":
        if num_mtp_heads:
            raise ValueError(
                f"num_mtp_heads={num_mtp_heads}: MTP depths are added when converting a stock checkpoint to SlimMoe; "
                f"this SlimMoe source keeps its own {config.num_mtp_heads}."
            )
        slim = config
    else:
        if num_mtp_heads and to != "slim_moe":
            raise ValueError(
                f"num_mtp_heads={num_mtp_heads} adds MTP depths to a SlimMoe output; to={to!r} is a stock family, "
                "which has no place for them."
            )
        slim = slim_config_from_hf(config, num_mtp_heads=num_mtp_heads)
    return slim, slim if to == "slim_moe" else hf_config_from_slim(slim, to)


def _copy_attn_implementation(source: PreTrainedModel, target: PreTrainedModel) -> None:
    implementation = source.config._attn_implementation
    if implementation is not None and implementation != target.config._attn_implementation:
        target.set_attn_implementation(implementation)


def _copy_generation_config(source: PreTrainedModel, target: PreTrainedModel) -> None:
    # the source's generation defaults (sampling, stop tokens) belong to the weights, not to the family
    if getattr(source, "generation_config", None) is not None and target.can_generate():
        target.generation_config = copy.deepcopy(source.generation_config)


@torch.no_grad()
def _init_mtp_from_last_layer(model: SlimMoeForCausalLM) -> None:
    sparse = [i for i, kind in enumerate(model.config.mlp_layer_types) if kind == "sparse"]
    if model.mtp is None or not sparse:
        return
    source = model.model.layers[sparse[-1]].state_dict()
    for layer in model.mtp.layers:
        # the decoder block of each depth; its own enorm / hnorm / eh_proj / post_norm keep their init
        _, unexpected = layer.load_state_dict(source, strict=False)
        if unexpected:
            raise ValueError(f"MTP depth {layer.depth} has no place for {unexpected} of the last sparse layer.")


def from_hf(model: PreTrainedModel, num_mtp_heads: int = 0, mtp_init: str = "last_layer") -> SlimMoeForCausalLM:
    """Convert a stock transformers MoE causal LM into a `SlimMoeForCausalLM` with identical logits.

    Args:
        model: A `Qwen3MoeForCausalLM`, `Qwen2MoeForCausalLM`, `OlmoeForCausalLM` or `MixtralForCausalLM`.
        num_mtp_heads: MTP depths to add. They are new weights: `eh_proj` and the norms get the model's standard init
            (normal(0, initializer_range) / ones) and, with `mtp_init="last_layer"`, every MTP block starts as a copy
            of the last sparse decoder block (a warm start; `mtp_init="random"` keeps the standard init).
        mtp_init: `"last_layer"` or `"random"`.

    Returns:
        The SlimMoe model, in the source model's dtype, attention implementation and generation config.
    """
    if mtp_init not in ("last_layer", "random"):
        raise ValueError(f"mtp_init must be 'last_layer' or 'random', got {mtp_init!r}.")
    config = slim_config_from_hf(model.config, num_mtp_heads=num_mtp_heads)
    slim = SlimMoeForCausalLM(config).to(dtype=model.dtype, device=model.device)
    missing, unexpected = slim.load_state_dict(model.state_dict(), strict=False)
    missing = [key for key in missing if not key.startswith("mtp.") and key != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"State dict mismatch converting {model.config.model_type}: missing {missing}, unexpected {unexpected}.")
    if mtp_init == "last_layer":
        _init_mtp_from_last_layer(slim)
    _copy_attn_implementation(model, slim)
    _copy_generation_config(model, slim)
    return slim.eval() if not model.training else slim


def to_hf(model: SlimMoeForCausalLM, model_type: str) -> PreTrainedModel:
    """Convert a `SlimMoeForCausalLM` into the stock transformers model of `model_type` with identical logits.

    MTP heads have no place in stock modules and are dropped here; `hf_slim.hub.save_for_hub(..., model_type=...)`
    can keep them in the checkpoint under `mtp.*` (transformers' MTP layout, see `docs/mtp.md`), which stock
    transformers ignores.

    Raises:
        ValueError: if `model_type` is unsupported (the message lists the supported ones) or the SlimMoe config uses
            a feature that family cannot express (the message names the field).
    """
    config = hf_config_from_slim(model.config, model_type)
    stock = _family(model_type).model_class(config).to(dtype=model.dtype, device=model.device)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("mtp.")}
    stock.load_state_dict(state, strict=not config.tie_word_embeddings)
    _copy_attn_implementation(model, stock)
    _copy_generation_config(model, stock)
    return stock.eval() if not model.training else stock


__all__ = [
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "conversion_configs",
    "from_hf",
    "hf_config_from_slim",
    "slim_config_from_hf",
    "to_hf",
]
