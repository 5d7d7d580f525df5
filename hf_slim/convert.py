"""Lossless conversion between stock transformers MoE models and SlimMoe.

The supported families store their weights under the same names (`model.layers.N.self_attn.q_proj`, `mlp.gate`,
`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.shared_expert`, ...) but for a few renames a family's spec declares
(GLM-4-MoE's `mlp.shared_experts`), so conversion is a config translation plus a strict state-dict copy. What each
family does differently (biases, q/k norms, shared expert and its gate, dense layers, sliding windows, top-k
renormalisation, sigmoid routing in expert groups, partial rotary) is a SlimMoe config field, so the logits match the
stock model exactly. The translation of each family lives in its axes spec (`hf_slim/anatomy/<model_type>.py`:
`to_slim_moe` / `from_slim_moe` / `slim_moe_renames`); the families here are the anatomy registry's families that
have one. `conversion_configs` gives both configs of a conversion without touching a weight;
`hf_slim.convert_checkpoint` (`hf_slim/convert_streaming.py`) converts a checkpoint on disk with it, one tensor at a
time.

MTP: families that store MTP layers after their decoder layers (GLM-4-MoE: `model.layers.{N + k}`, with
`shared_head.norm` after the block and, in GLM-4.5's checkpoints, copies of the embedding and the head) hold them in
their own layout on both sides: layer `N + k` is SlimMoe's MTP depth `mtp.layers.{k}` (`post_norm` for
`shared_head.norm`; the copies are the model's own embedding and head, written from them on export). The other stock
families have no place for MTP heads (`hf_slim.hub.save_for_hub` keeps them beside the weights in `mtp.safetensors`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from transformers import CONFIG_MAPPING, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .anatomy import get_spec, supported_model_types
from .anatomy.mtp_blocks import attach_mtp_layers
from .integrations.transformers_mtp import mtp_layer_numbers, mtp_weights_found
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


def conversion_refusal(model_type: str) -> str:
    """Why a family with an axes spec does not convert (its spec's `no_slim_moe`), or `""`."""
    return get_spec(model_type).no_slim_moe if model_type in supported_model_types() else ""


def _family(model_type: str) -> _Family:
    if model_type not in FAMILIES:
        raise ValueError(
            conversion_refusal(model_type)
            or f"Unsupported model_type {model_type!r}; hf_slim.convert supports {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return FAMILIES[model_type]


# ---- tensor names: a stock family's model naming <-> SlimMoe's -------------------------------------------------------
def _native_mtp(model_type: str):
    """The family's `TrailingMtp` when it stores MTP layers after its decoder layers, else `None`."""
    return get_spec(model_type).trailing_mtp if model_type in FAMILIES else None


def slim_name(config: PreTrainedConfig, name: str) -> str | None:
    """The SlimMoe name of tensor `name` of a model of `config` (a stock family or SlimMoe, model naming), or `None`
    for what SlimMoe holds no copy of (an MTP layer's copies of the embedding and the head)."""
    if config.model_type == "slim_moe":
        return name
    spec = get_spec(config.model_type)
    block, rel = spec.split_name(name)
    if block is None:
        return name
    for family, slim in spec.slim_moe_renames:
        if rel.startswith(family):
            rel = slim + rel[len(family) :]
            break
    mtp, number, n = spec.trailing_mtp, int(block.rsplit(".", 1)[1]), config.num_hidden_layers
    if mtp is None or not spec.is_decoder_block(block) or number < n:
        return f"{block}.{rel}"
    if any(rel == f"{copy}.weight" for copy in mtp.optional):
        return None
    if rel.startswith(mtp.post_norm + "."):
        rel = "post_norm." + rel[len(mtp.post_norm) + 1 :]
    return f"mtp.layers.{number - n}.{rel}"


def stock_name(config: PreTrainedConfig, name: str) -> str:
    """The name in a model of `config` (a stock family or SlimMoe, model naming) of the SlimMoe tensor `name`. MTP
    tensors of families without a place for them keep their SlimMoe name (`mtp.*`)."""
    if config.model_type == "slim_moe":
        return name
    spec = get_spec(config.model_type)
    block, rel = get_spec("slim_moe").split_name(name)
    if block is None:
        return name
    for family, slim in spec.slim_moe_renames:
        if rel.startswith(slim):
            rel = family + rel[len(slim) :]
            break
    mtp = spec.trailing_mtp
    if not block.startswith("mtp.layers."):
        return f"{block}.{rel}"
    if mtp is None:
        return name
    if rel.startswith("post_norm."):
        rel = f"{mtp.post_norm}.{rel[len('post_norm.') :]}"
    return f"{spec.block_containers[0]}.{config.num_hidden_layers + int(block.rsplit('.', 1)[1])}.{rel}"


def tensor_name(name: str, source: PreTrainedConfig, target: PreTrainedConfig) -> str | None:
    """The name in a model of `target` of tensor `name` of a model of `source` (both: model naming, through
    SlimMoe's), or `None` when the target has no place for it."""
    slim = slim_name(source, name)
    return None if slim is None else stock_name(target, slim)


def mtp_copies(config: PreTrainedConfig) -> dict[str, str]:
    """The copies of the embedding and the head each MTP layer of a stock `config` holds in its family's layout
    (GLM-4.5's `embed_tokens` and `shared_head.head`), as `{stock name: SlimMoe name they copy}`; empty for a family
    without MTP layers of its own."""
    mtp = _native_mtp(config.model_type)
    if mtp is None:
        return {}
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    sources = dict(zip(mtp.optional, ("model.embed_tokens.weight", head)))
    container, n = get_spec(config.model_type).block_containers[0], config.num_hidden_layers
    return {
        f"{container}.{n + k}.{copy}.weight": source
        for k in range(mtp.count(config))
        for copy, source in sources.items()
    }


def mtp_depths(config: PreTrainedConfig, names: Iterable[str]) -> int:
    """How many MTP depths a checkpoint of `config` holding tensor `names` carries in its family's own layout
    (`model.layers.{N + k}` for GLM-4-MoE; the leading depths with tensors); 0 for other families."""
    if _native_mtp(config.model_type) is None:
        return 0
    from .anatomy.mtp_blocks import mtp_blocks

    return len(mtp_blocks(get_spec(config.model_type), config, names))


def mtp_found_by_transformers(config: PreTrainedConfig) -> tuple[bool, list[int]]:
    """Whether stock transformers' `generate(use_mtp=True)` finds the MTP layers a stock `config` declares (its
    `MtpModel` looks only at fixed layer numbers, GLM-4-MoE's 46 and 92), and those numbers."""
    model_class = FAMILIES[config.model_type].model_class
    n, depths = config.num_hidden_layers, _native_mtp(config.model_type).count(config)
    names = [f"model.layers.{n + k}.enorm.weight" for k in range(depths)]
    return mtp_weights_found(model_class, n, names), sorted(mtp_layer_numbers(model_class))


def warn_if_mtp_hidden(config: PreTrainedConfig) -> None:
    """Warn (one sentence) when the MTP layers of an export to `config` sit where stock transformers does not look."""
    mtp = _native_mtp(config.model_type)
    if mtp is None or not mtp.count(config):
        return
    found, numbers = mtp_found_by_transformers(config)
    if not found:
        n = config.num_hidden_layers
        warnings.warn(
            f"{config.model_type}: the {mtp.count(config)} MTP layer(s) are written at model.layers.{n}, but "
            f"transformers loads {config.model_type}'s MTP layers only from "
            f"{' or '.join(f'model.layers.{k}' for k in numbers)}, so stock generate(use_mtp=True) will not find them "
            "(hf-slim convert back to SlimMoe keeps them and drafts with them).",
            stacklevel=3,
        )


def _check_mtp_export(config: SlimMoeConfig, model_type: str) -> None:
    if config.num_mtp_heads and config.mtp_shared_norm:
        raise ValueError(
            f"Cannot export the MTP heads to {model_type!r}: config.mtp_shared_norm=True (hf-slim's first MTP layout, "
            f"one norm shared by every depth) but each {model_type} MTP layer has its own norm; export with "
            "keep_mtp=False."
        )


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
        raise ValueError(
            conversion_refusal(to) or f"to={to!r} is not a family hf_slim converts to; valid values: {', '.join(targets)}."
        )
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


def _carried_mtp_depths(model: PreTrainedModel) -> int:
    """MTP layers a stock model holds after its decoder layers (attached by `hf_slim.anatomy.attach_mtp_layers`)."""
    if _native_mtp(model.config.model_type) is None:
        return 0
    layers = model.get_submodule(get_spec(model.config.model_type).block_containers[0])
    return len(layers) - model.config.num_hidden_layers


@contextlib.contextmanager
def _built_in(dtype: torch.dtype):
    """Build modules in `dtype`, as `from_pretrained` builds them: tensors a model creates in float32 on purpose (RoPE
    frequencies, GLM-4-MoE's router) stay in float32, which `.to(dtype)` would round."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def _keep_source_dtypes(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every tensor of `model` that `state` holds in another floating-point dtype that dtype and value (GLM-4-MoE
    keeps its router in float32 in a bfloat16 model), so conversion rounds nothing."""
    for name, value in state.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        current = module._parameters.get(leaf, module._buffers.get(leaf))
        if current is not None and value.is_floating_point() and current.dtype != value.dtype:
            current.data = value.detach().to(current.device).clone()


def from_hf(model: PreTrainedModel, num_mtp_heads: int = 0, mtp_init: str = "last_layer") -> SlimMoeForCausalLM:
    """Convert a stock transformers MoE causal LM into a `SlimMoeForCausalLM` with identical logits.

    Args:
        model: A causal LM of one of `SUPPORTED_MODEL_TYPES` (`Qwen3MoeForCausalLM`, `Qwen2MoeForCausalLM`,
            `OlmoeForCausalLM`, `MixtralForCausalLM`, `Glm4MoeForCausalLM`).
        num_mtp_heads: MTP depths to add. They are new weights: `eh_proj` and the norms get the model's standard init
            (normal(0, initializer_range) / ones) and, with `mtp_init="last_layer"`, every MTP block starts as a copy
            of the last sparse decoder block (a warm start; `mtp_init="random"` keeps the standard init). A GLM-4-MoE
            model holding its MTP layers (attached after its decoder layers by `hf_slim.anatomy.attach_mtp_layers`,
            as hf-slim's pruning does) converts with them instead: `0` or their number.
        mtp_init: `"last_layer"` or `"random"`.

    Returns:
        The SlimMoe model, in the source model's dtype (tensors the source keeps in another dtype, such as GLM-4-MoE's
        float32 router, keep it), attention implementation and generation config.
    """
    if mtp_init not in ("last_layer", "random"):
        raise ValueError(f"mtp_init must be 'last_layer' or 'random', got {mtp_init!r}.")
    _family(model.config.model_type)
    carried = _carried_mtp_depths(model)
    if carried and num_mtp_heads and num_mtp_heads != carried:
        raise ValueError(
            f"num_mtp_heads={num_mtp_heads}, but the model holds {carried} MTP layer(s) after its decoder layers, "
            f"which the conversion keeps; pass num_mtp_heads=0 (or {carried})."
        )
    config = slim_config_from_hf(model.config, num_mtp_heads=carried or num_mtp_heads)
    with _built_in(model.dtype):
        slim = SlimMoeForCausalLM(config).to(device=model.device)
    state = {}
    for name, tensor in model.state_dict().items():
        if (new := slim_name(model.config, name)) is not None:
            state[new] = tensor
    missing, unexpected = slim.load_state_dict(state, strict=False)
    missing = [key for key in missing if not (key.startswith("mtp.") and not carried) and key != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"State dict mismatch converting {model.config.model_type}: missing {missing}, unexpected {unexpected}.")
    _keep_source_dtypes(slim, state)
    if mtp_init == "last_layer" and not carried:
        _init_mtp_from_last_layer(slim)
    _copy_attn_implementation(model, slim)
    _copy_generation_config(model, slim)
    return slim.eval() if not model.training else slim


def stock_config_for_export(config: SlimMoeConfig, model_type: str, keep_mtp: bool = True) -> PreTrainedConfig:
    """`hf_config_from_slim(config, model_type)`, with the MTP layers a family stores after its decoder layers
    counted as the export writes them: `num_mtp_heads` with `keep_mtp`, else none.

    Raises:
        `ValueError`: as `hf_config_from_slim`, or MTP heads kept that the family's layout cannot hold.
    """
    target = hf_config_from_slim(config, model_type)
    mtp = _native_mtp(model_type)
    if mtp is not None:
        setattr(target, mtp.count_field, config.num_mtp_heads if keep_mtp else 0)
        if keep_mtp:
            _check_mtp_export(config, model_type)
    return target


def to_hf(model: SlimMoeForCausalLM, model_type: str, keep_mtp: bool = True) -> PreTrainedModel:
    """Convert a `SlimMoeForCausalLM` into the stock transformers model of `model_type` with identical logits.

    MTP heads: a family that stores MTP layers after its decoder layers (`glm4_moe`) gets them in its own layout
    (`model.layers.{N + k}`, attached as buffers as `hf_slim.anatomy.attach_mtp_layers` attaches them, with copies of
    the embedding and the head), which `save_pretrained` writes where transformers' `generate(use_mtp=True)` looks
    for them when `N` is 46 or 92 (a warning says so otherwise); `keep_mtp=False` leaves them out. The other families
    have no place for them and they are dropped; `hf_slim.hub.save_for_hub(..., model_type=...)` can keep them in the
    checkpoint under `mtp.*` (transformers' MTP layout, see `docs/mtp.md`), which stock transformers ignores.

    Raises:
        ValueError: if `model_type` is unsupported (the message lists the supported ones, or says why the family does
            not convert) or the SlimMoe config uses a feature that family cannot express (the message names the
            field).
    """
    if not isinstance(model, SlimMoeForCausalLM):
        raise TypeError(
            f"model must be a SlimMoeForCausalLM (from_hf converts the other way), got {type(model).__name__}."
        )
    config = stock_config_for_export(model.config, model_type, keep_mtp)
    with _built_in(model.dtype):
        stock = _family(model_type).model_class(config).to(device=model.device)
    source = model.state_dict()
    state = {stock_name(config, key): value for key, value in source.items() if not key.startswith("mtp.")}
    if _native_mtp(model_type) is not None and keep_mtp and model.config.num_mtp_heads:
        state.update({stock_name(config, key): value for key, value in source.items() if key.startswith("mtp.")})
        state.update({copy: source[name] for copy, name in mtp_copies(config).items()})
        for block in attach_mtp_layers(stock, state):
            stock.get_submodule(block).to_empty(device=model.device).to(model.dtype)
        warn_if_mtp_hidden(config)
    stock.load_state_dict(state, strict=not config.tie_word_embeddings)
    _keep_source_dtypes(stock, state)
    _copy_attn_implementation(model, stock)
    _copy_generation_config(model, stock)
    return stock.eval() if not model.training else stock


__all__ = [
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "conversion_configs",
    "from_hf",
    "hf_config_from_slim",
    "mtp_copies",
    "mtp_depths",
    "mtp_found_by_transformers",
    "slim_config_from_hf",
    "slim_name",
    "stock_config_for_export",
    "stock_name",
    "tensor_name",
    "to_hf",
    "warn_if_mtp_hidden",
]
