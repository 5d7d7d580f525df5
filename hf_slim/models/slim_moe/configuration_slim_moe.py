# Copyright 2026 The hf-slim developers. Licensed under the Apache License, Version 2.0.
"""SlimMoe model configuration: the fields and their validation.

The arithmetic of elastic variants lives in `variants_slim_moe.py`; the methods below that answer questions about
variants delegate to it. This file is copied next to the weights by `hf_slim.hub.save_for_hub`, so it imports nothing
from hf_slim.
"""

import os
import shutil
from typing import Any, Protocol, runtime_checkable

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.modeling_rope_utils import RopeParameters

from .variants_slim_moe import (  # noqa: F401  (ELASTIC_*, canonical_expert_widths: re-exported, imported from here)
    ELASTIC_FIELDS,
    ELASTIC_NESTED_FIELDS,
    FULL_VARIANT,
    build_variant_config,
    canonical_expert_widths,
    resolve_elastic_variants,
    variant_names,
    variant_sizes,
)


QK_NORM_TYPES = ("head", "full")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
MLP_LAYER_TYPES = ("sparse", "dense")
ROUTER_SCORING_TYPES = ("softmax", "sigmoid")
MODELING_FILE = "modeling_slim_moe.py"
#: The model classes of `auto_map` in a folder that holds [`MODELING_FILE`] (`hf_slim.hub.AUTO_MAP` less
#: `AutoConfig`, which transformers writes for the registered config class).
MODEL_AUTO_MAP = {
    "AutoModel": "modeling_slim_moe.SlimMoeModel",
    "AutoModelForCausalLM": "modeling_slim_moe.SlimMoeForCausalLM",
}


@runtime_checkable
class SupportsToDict(Protocol):
    """Any object with a `to_dict()`, such as `hf_slim.elastic.ElasticConfig`."""

    def to_dict(self) -> dict: ...


@strict
class SlimMoeConfig(PreTrainedConfig):
    r"""
    Configuration of a SlimMoe model: Qwen3-MoE-style decoder blocks (GQA attention with q/k RMSNorm and RoPE, partial
    rotary optional; softmax top-k routed experts stored as fused 3D tensors, or GLM-4-MoE's sigmoid routing with a
    score-correction bias inside expert groups; an optional shared expert, sigmoid-gated or not; optional dense
    layers) plus optional multi-token-prediction (MTP) heads in the DeepSeek-V3 / Qwen3-Next layout.

    The fields that stock MoE families spell differently are spelled here as in Qwen3-MoE, so that converters and the
    pruning/elastic axes specs can name them the same way for every family.

    Args:
        vocab_size (`int`): Vocabulary size.
        hidden_size (`int`): Width of the residual stream.
        intermediate_size (`int`): Width of the FFN of dense layers (see `mlp_layer_types`).
        num_hidden_layers (`int`): Number of decoder blocks.
        num_attention_heads (`int`): Number of query heads.
        num_key_value_heads (`int`): Number of key/value heads (GQA); must divide `num_attention_heads`.
        head_dim (`int`, *optional*): Per-head width; defaults to `hidden_size // num_attention_heads`.
        hidden_act (`str`): Activation of the gated FFNs.
        max_position_embeddings (`int`): Longest sequence the RoPE tables are built for.
        initializer_range (`float`): Std of the normal init.
        rms_norm_eps (`float`): RMSNorm epsilon.
        use_cache (`bool`): Whether generation uses a KV cache.
        tie_word_embeddings (`bool`): Share the input embedding and the LM head.
        rope_parameters (`dict`, *optional*): RoPE settings as in transformers (`rope_type`, `rope_theta`, ...);
            `partial_rotary_factor` (also accepted as a keyword, as transformers does) rotates only the first
            `int(head_dim * partial_rotary_factor)` channels of each head (GLM-4-MoE: 0.5), the default 1.0 all.
        attention_bias (`bool`): Bias on the q/k/v projections.
        attention_output_bias (`bool`): Bias on the output projection.
        qk_norm (`str`, *optional*): `"head"` (per-head RMSNorm, Qwen3), `"full"` (RMSNorm over the whole projected
            width, OLMoE) or `None`.
        clip_qkv (`float`, *optional*): Clamp q/k/v to [-clip_qkv, clip_qkv] (OLMoE).
        sliding_window (`int`, *optional*): Window of the `"sliding_attention"` layers.
        layer_types (`list[str]`, *optional*): Per layer `"full_attention"` or `"sliding_attention"`.
        attention_dropout (`float`): Dropout on attention probabilities.
        num_experts (`int`): Routed experts per sparse layer.
        num_experts_per_tok (`int`): Experts each token is routed to (top-k).
        moe_intermediate_size (`int` or `list[int]`): FFN width of one routed expert: one int for every layer, or one
            per decoder layer (as Gemma 3n's `intermediate_size`; entries of dense layers are unused). MTP blocks use
            the widest sparse layer's width (see `expert_intermediate_size`).
        norm_topk_prob (`bool`): Renormalise the top-k routing weights to sum to one.
        router_scoring (`str`): `"softmax"` (probabilities over all experts, Qwen-MoE) or `"sigmoid"` (independent
            sigmoid scores, GLM-4-MoE / DeepSeek-V3): the router then holds `e_score_correction_bias` (one per expert,
            kept in float32), added to the scores only to choose the experts, and weighs them by their plain scores.
        n_group (`int`): With `"sigmoid"` scoring, the experts form `n_group` consecutive groups; each group is scored
            by its two best (bias-corrected) scores and a token routes only within its `topk_group` best groups.
        topk_group (`int`): Groups a token may route to (see `n_group`).
        routed_scaling_factor (`float`): Multiplies the routed experts' weights (after `norm_topk_prob`).
        shared_expert_intermediate_size (`int`): FFN width of the shared expert; 0 means none.
        shared_expert_gated (`bool`): Scale the shared expert's output by `sigmoid(shared_expert_gate(x))`
            (Qwen2-MoE); `False` adds it as it is (GLM-4-MoE's shared experts, no `shared_expert_gate` tensor).
        mlp_layer_types (`list[str]`, *optional*): Per layer `"sparse"` (MoE) or `"dense"`; defaults to all sparse.
        router_aux_loss_coef (`float`): Weight of the load-balancing loss added to the loss when router logits are
            returned.
        output_router_logits (`bool`): Return router logits (and the aux loss) by default.
        num_mtp_heads (`int`): Number D >= 0 of multi-token-prediction depths (also readable and settable as
            `num_mtp_layers`, the name transformers' MTP decoding reads). Depth k's tensors are `mtp.layers.{k-1}.*`
            in transformers' MTP layout (`enorm`, `hnorm`, `eh_proj`, `post_norm` and a sparse decoder block); see
            `docs/mtp.md`.
        mtp_loss_weight (`float`): Weight of the mean MTP loss in `loss` when labels are given.
        mtp_shared_norm (`bool`): The arithmetic of hf-slim's first MTP layout, kept for its checkpoints (set when one
            with two or more depths is loaded): the depths have no `post_norm`, one RMSNorm `mtp.norm` shared by all
            of them comes before the LM head, and each depth passes its un-normed output to the next.
        elastic (`dict` or `ElasticConfig`, *optional*): Nested elastic variants `{"variants": {name: {field: size}}}`
            (or an `hf_slim.elastic.ElasticConfig`, stored as its `to_dict()`); stored as plain JSON and validated on
            load. Every variant is a prefix of the full model along every axis; `variant_config(name)` gives a plain
            config of that size.
    """

    model_type = "slim_moe"
    # `num_mtp_layers` is what transformers' MTP decoding (`MTPCandidateGenerator`, `get_mtp_config`) reads
    attribute_map = {"num_mtp_layers": "num_mtp_heads"}
    # Outputs Trainer.prediction_step leaves out of the predictions it gathers, so `predict` / `compute_metrics` see the
    # logits as with a stock model: the KV cache (`cache` since transformers 5.24) and the per-term / MTP outputs.
    keys_to_ignore_at_inference = ["cache", "lm_loss", "mtp_losses", "mtp_hidden_states", "mtp_logits"]
    default_theta = 1000000.0

    # Parallel plans, as stock Qwen3-MoE's: `base_model_tp_plan` depends on the config (see `tp_plan_for`), the
    # expert-parallel plan does not. The MTP depths (`mtp.layers.*`, outside the base model) carry the same plans
    # on their own module (`mtp_tp_plan_for`); `lm_head`'s entry is on `SlimMoeForCausalLM._tp_plan`.
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_output_bias: bool = False
    qk_norm: str | None = "head"
    clip_qkv: float | int | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    attention_dropout: float | int = 0.0
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int | list[int] = 768
    norm_topk_prob: bool = True
    router_scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float | int = 1.0
    shared_expert_intermediate_size: int = 0
    shared_expert_gated: bool = True
    mlp_layer_types: list[str] | None = None
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    num_mtp_heads: int = 0
    mtp_loss_weight: float = 0.3
    mtp_shared_norm: bool = False
    elastic: dict | SupportsToDict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __setattr__(self, key, value):
        # `config.elastic` is always stored as its plain dict (JSON in config.json), as transformers does with
        # `quantization_config` objects. This file ships next to the weights as remote code and imports nothing
        # from hf_slim, so an `ElasticConfig` is recognised by duck typing: any object with a `to_dict()`.
        if key == "elastic" and value is not None and not isinstance(value, dict) and isinstance(value, SupportsToDict):
            value = value.to_dict()
        super().__setattr__(key, value)

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        derived_head_dim = self.head_dim is None
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse"] * self.num_hidden_layers
        if self.layer_types is None:
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        self._check_fields(derived_head_dim)
        super().__post_init__(**kwargs)
        self._check_rotary()  # after transformers moved a `partial_rotary_factor` keyword into rope_parameters

    def _check_fields(self, derived_head_dim: bool = False) -> None:
        # Raised as plain ValueError (not a strict-dataclass validator) so users see the field name directly.
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_experts",
            "num_experts_per_tok",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SlimMoeConfig.{name} must be a positive integer, got {value!r}.")
        widths = self.moe_intermediate_size
        if isinstance(widths, list):
            if len(widths) != self.num_hidden_layers:
                raise ValueError(
                    f"SlimMoeConfig.moe_intermediate_size has {len(widths)} entries but num_hidden_layers is "
                    f"{self.num_hidden_layers}; give one positive integer, or one per layer."
                )
            bad = [w for w in widths if isinstance(w, bool) or not isinstance(w, int) or w <= 0]
            if bad:
                raise ValueError(
                    f"SlimMoeConfig.moe_intermediate_size entries must be positive integers, got {bad} in {widths}."
                )
        elif isinstance(widths, bool) or not isinstance(widths, int) or widths <= 0:
            raise ValueError(
                f"SlimMoeConfig.moe_intermediate_size must be a positive integer or a list of one per layer, got "
                f"{widths!r}."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"SlimMoeConfig.num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads}); valid values are the divisors of {self.num_attention_heads}."
            )
        if self.num_attention_heads * self.head_dim != self.hidden_size and derived_head_dim:
            raise ValueError(
                f"SlimMoeConfig.hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                f"{self.num_attention_heads}, so head_dim = hidden_size // num_attention_heads is not whole; pick a "
                "multiple, or set head_dim."
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"SlimMoeConfig.num_experts_per_tok ({self.num_experts_per_tok}) is larger than num_experts "
                f"({self.num_experts}); it must be between 1 and num_experts."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"SlimMoeConfig.head_dim must be even for RoPE, got {self.head_dim}.")
        for name in ("shared_expert_intermediate_size", "num_mtp_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"SlimMoeConfig.{name} must be an integer >= 0, got {value!r}.")
        check_routing(self)
        if self.qk_norm is not None and self.qk_norm not in QK_NORM_TYPES:
            raise ValueError(f"SlimMoeConfig.qk_norm must be one of {QK_NORM_TYPES} or None, got {self.qk_norm!r}.")
        for name, allowed in (("mlp_layer_types", MLP_LAYER_TYPES), ("layer_types", ATTENTION_LAYER_TYPES)):
            values = getattr(self, name)
            if len(values) != self.num_hidden_layers:
                raise ValueError(
                    f"SlimMoeConfig.{name} has {len(values)} entries but num_hidden_layers is "
                    f"{self.num_hidden_layers}; give one entry per layer."
                )
            bad = sorted({v for v in values if v not in allowed})
            if bad:
                raise ValueError(f"SlimMoeConfig.{name} has invalid entries {bad}; valid entries are {allowed}.")
        if "dense" in self.mlp_layer_types and (not isinstance(self.intermediate_size, int) or self.intermediate_size <= 0):
            raise ValueError(
                f"SlimMoeConfig.intermediate_size must be a positive integer when mlp_layer_types has dense layers, "
                f"got {self.intermediate_size!r}."
            )
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("SlimMoeConfig.sliding_window must be set when layer_types has 'sliding_attention'.")
        self._check_ranges()
        if self.mtp_loss_weight < 0:
            raise ValueError(f"SlimMoeConfig.mtp_loss_weight must be >= 0, got {self.mtp_loss_weight}.")
        if self.elastic is not None:
            resolve_elastic_variants(self.elastic, self)

    def _check_ranges(self) -> None:
        # (field, valid, what is valid): the numeric fields past the sizes, one sentence each
        ranges = (
            ("rms_norm_eps", lambda v: v > 0, "a number > 0 (RMSNorm divides by sqrt(mean(x^2) + eps))"),
            ("max_position_embeddings", lambda v: isinstance(v, int) and v > 0, "a positive integer"),
            ("initializer_range", lambda v: v >= 0, "a number >= 0"),
            ("attention_dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
            ("router_aux_loss_coef", lambda v: v >= 0, "a number >= 0"),
            ("clip_qkv", lambda v: v is None or v > 0, "None or a number > 0"),
            ("sliding_window", lambda v: v is None or v > 0, "None or a positive integer"),
        )
        for name, valid, what in ranges:
            value = getattr(self, name)
            if (value is not None and isinstance(value, bool)) or not valid(value):
                raise ValueError(f"SlimMoeConfig.{name} must be {what}, got {value!r}.")
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            raise ValueError(f"SlimMoeConfig.hidden_act={self.hidden_act!r} is unknown; valid values: {sorted(ACT2FN)}.")
        pad = self.pad_token_id
        if pad is not None and (isinstance(pad, bool) or not 0 <= pad < self.vocab_size):
            raise ValueError(
                f"SlimMoeConfig.pad_token_id={pad!r} is outside the vocabulary; valid values: None or 0..{self.vocab_size - 1}."
            )

    def _check_rotary(self) -> None:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope = self.rope_parameters or {}
        kind = rope.get("rope_type", "default")
        if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"SlimMoeConfig.rope_parameters['rope_type']={kind!r} is unknown; valid values: "
                f"{['default', *sorted(ROPE_INIT_FUNCTIONS)]}."
            )
        theta = rope.get("rope_theta", self.default_theta)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ValueError(f"SlimMoeConfig.rope_parameters['rope_theta'] must be a number > 0, got {theta!r}.")
        factor = rope.get("partial_rotary_factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            raise ValueError(
                f"SlimMoeConfig.rope_parameters['partial_rotary_factor'] must be in (0, 1], got {factor!r}."
            )
        if int(self.head_dim * factor) % 2:
            raise ValueError(
                f"SlimMoeConfig.rope_parameters['partial_rotary_factor']={factor} rotates int(head_dim * factor) = "
                f"{int(self.head_dim * factor)} channels of head_dim={self.head_dim}; RoPE needs an even number."
            )

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """transformers' tensor-parallel plan of the decoder stack (`model.*`) for this config: see `tp_plan_for`."""
        return tp_plan_for(self)

    def expert_intermediate_size(self, layer_idx: int) -> int:
        """FFN width of the routed experts of block `layer_idx`; MTP block `k` is `num_hidden_layers + k` and uses
        the widest sparse decoder layer's width when `moe_intermediate_size` is a per-layer list."""
        widths = self.moe_intermediate_size
        if not isinstance(widths, list):
            return widths
        if layer_idx < self.num_hidden_layers:
            return widths[layer_idx]
        return _mtp_width(widths, self.mlp_layer_types)

    # ---- transformers' MTP config protocol (`get_mtp_config`), see mtp_slim_moe.py --------------------------------
    @property
    def mtp_layer_types(self) -> list[str]:
        """Attention type of each MTP depth's block: full attention."""
        return ["full_attention"] * self.num_mtp_heads

    @property
    def mtp_mlp_layer_types(self) -> list[str]:
        """FFN type of each MTP depth's block: sparse (routed experts)."""
        return ["sparse"] * self.num_mtp_heads

    def get_mtp_config(self) -> "SlimMoeConfig":
        """The config of the MTP depths as a stack of `num_mtp_heads` layers (what transformers' `MtpModel` and
        `MtpCache` are built from): `PreTrainedConfig.get_mtp_config`, with the MTP blocks' expert width as one int
        and no elastic variants (their layer numbers belong to the decoder stack).

        Raises:
            `ValueError`: the config has no MTP heads.
        """
        if not self.num_mtp_heads:
            raise ValueError("SlimMoeConfig.get_mtp_config(): this config has no MTP heads (num_mtp_heads=0).")
        mtp = super().get_mtp_config()
        mtp.moe_intermediate_size = self.expert_intermediate_size(self.num_hidden_layers)
        mtp.elastic = None
        return mtp

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """`PreTrainedConfig.save_pretrained`, shipping the family's code next to `config.json`.

        The class is registered for `AutoConfig` (below), so transformers copies this file and the ones it imports
        and names the class in `auto_map`; this also copies [`MODELING_FILE`] and the files it imports and names the
        model classes ([`MODEL_AUTO_MAP`]). A model's `save_pretrained` saves its config here, so every folder a
        SlimMoe model is written to (`save_pretrained`, Trainer checkpoints, `trainer.save_model`, distillation
        stages, FSDP2 exports) loads with `AutoModel(ForCausalLM).from_pretrained(folder, trust_remote_code=True)`
        where hf_slim is not installed, with `auto_map` equal to `hf_slim.hub.AUTO_MAP`.
        """
        if self._auto_class is not None and not os.path.isfile(save_directory):
            # next to this file in hf_slim; as remote code, transformers caches the config's and the model's files
            # apart, and a remote model's own save_pretrained has copied its files into the folder already
            modeling = os.path.join(os.path.dirname(os.path.abspath(__file__)), MODELING_FILE)
            if os.path.isfile(modeling):
                os.makedirs(save_directory, exist_ok=True)
                for source in [modeling, *get_relative_import_files(modeling)]:
                    shutil.copyfile(source, os.path.join(save_directory, os.path.basename(source)))
            # name the model classes exactly when the folder holds their file
            auto_map = {k: v for k, v in (getattr(self, "auto_map", None) or {}).items() if MODEL_AUTO_MAP.get(k) != v}
            shipped = os.path.isfile(os.path.join(save_directory, MODELING_FILE))
            self.auto_map = {**auto_map, **MODEL_AUTO_MAP} if shipped else auto_map
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    # ---- elastic variants (the arithmetic lives in variants_slim_moe.py) ---------------------------------------
    def elastic_variant_names(self) -> list[str]:
        """Names of the nested variants, smallest first, ending with the implicit `"full"`."""
        return variant_names(self)

    def elastic_variant_sizes(self, name: str) -> dict[str, Any]:
        """Every elastic field of variant `name` resolved against this config.

        Returns:
            `dict` with `layers` (the kept decoder layers, as indices of this model) and one int per entry of
            `ELASTIC_FIELDS` (`num_hidden_layers` being `len(layers)`; `moe_intermediate_size` may be a list of one
            width per kept layer, in the form of `canonical_expert_widths`).

        Raises:
            `ValueError`: the config has no `elastic` variants (and `name` is not `"full"`).
            `KeyError`: unknown `name`, listing the variants.
        """
        return variant_sizes(self, name)

    def variant_config(self, name: str) -> "SlimMoeConfig":
        """A plain `SlimMoeConfig` of the size of variant `name`.

        The result still carries, under `elastic`, the variants that fit inside `name` (re-expressed against its
        own layer numbering), so a model sliced to `name` is itself elastic over what it contains.
        """
        return build_variant_config(self, name)


# Every `save_pretrained` of a config, and so of a model, then ships the family's code (see `save_pretrained`). The
# model classes stay unregistered: a model's registration would make transformers copy the module of the model's
# class, which FSDP2 replaces with a subclass defined in torch. Also runs when this file is imported as remote code,
# where transformers' AutoConfig registers the class the same way.
SlimMoeConfig.register_for_auto_class("AutoConfig")


def check_routing(config: Any) -> None:
    """Raise `ValueError` (one sentence naming the field) when `config`'s router settings cannot route: an unknown
    `router_scoring`, groups without sigmoid scoring, or group counts the experts do not fill."""
    scoring = getattr(config, "router_scoring", "softmax")
    if scoring not in ROUTER_SCORING_TYPES:
        raise ValueError(f"SlimMoeConfig.router_scoring must be one of {ROUTER_SCORING_TYPES}, got {scoring!r}.")
    n_group, topk_group = getattr(config, "n_group", 1), getattr(config, "topk_group", 1)
    for name, value in (("n_group", n_group), ("topk_group", topk_group)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"SlimMoeConfig.{name} must be a positive integer, got {value!r}.")
    factor = getattr(config, "routed_scaling_factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise ValueError(f"SlimMoeConfig.routed_scaling_factor must be a number > 0, got {factor!r}.")
    if scoring == "softmax":
        if n_group != 1 or topk_group != 1:
            raise ValueError(
                f"SlimMoeConfig.n_group={n_group}, topk_group={topk_group}: group-limited routing is part of "
                "router_scoring='sigmoid'; the softmax router has no groups (use n_group=1, topk_group=1)."
            )
        return
    experts, top_k = config.num_experts, config.num_experts_per_tok
    size = experts // n_group
    if experts % n_group or size < 2:
        raise ValueError(
            f"SlimMoeConfig.n_group={n_group}: the sigmoid router scores each group by its two best experts, so "
            f"num_experts={experts} must split into n_group groups of at least two."
        )
    if topk_group > n_group:
        raise ValueError(f"SlimMoeConfig.topk_group={topk_group} is larger than n_group={n_group}.")
    if top_k > topk_group * size:
        raise ValueError(
            f"SlimMoeConfig.num_experts_per_tok={top_k}: a token reaches only topk_group * experts per group = "
            f"{topk_group} * {size} experts."
        )


# ---- parallel plans -------------------------------------------------------------------------------------------
# One decoder block's entries. Per-head q/k norms see only the heads of their rank: their gradient is partial, so
# it is summed over the mesh (Qwen3-MoE's `replicated_with_grad_allreduce`).
_ATTENTION_TP_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
}
_HEAD_QK_NORM_TP_PLAN = {
    "self_attn.q_norm": "replicated_with_grad_allreduce",
    "self_attn.k_norm": "replicated_with_grad_allreduce",
}
# A norm over the whole projected width (OLMoE) needs every channel on every rank: q/k/v are gathered, attention
# runs whole on each rank and `o_proj` splits its replicated input (OLMoE's plan); the norms stay replicated.
_FULL_QK_NORM_ATTENTION_TP_PLAN = {
    "self_attn.q_proj": "colwise_gather_output",
    "self_attn.k_proj": "colwise_gather_output",
    "self_attn.v_proj": "colwise_gather_output",
    "self_attn.o_proj": "rowwise_split_input",
}
_EXPERTS_TP_PLAN = {
    "mlp.experts.gate_up_proj": "packed_colwise",
    "mlp.experts.down_proj": "rowwise",
    "mlp.experts": "moe_tp_experts",
}
_SHARED_EXPERT_TP_PLAN = {
    "mlp.shared_expert.gate_proj": "colwise",
    "mlp.shared_expert.up_proj": "colwise",
    "mlp.shared_expert.down_proj": "rowwise",
}
_DENSE_MLP_TP_PLAN = {"mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"}
# No entry names the RMSNorms (besides per-head q/k), the router (`mlp.gate`, its `e_score_correction_bias` buffer)
# or the 1-wide `shared_expert_gate`: they stay replicated, and as their inputs are replicated, so are their gradients.


def _block_tp_plan(config: Any, mlp_types: set[str]) -> dict[str, str]:
    if config.qk_norm == "full":
        plan = dict(_FULL_QK_NORM_ATTENTION_TP_PLAN)
    else:
        plan = {**_ATTENTION_TP_PLAN, **(_HEAD_QK_NORM_TP_PLAN if config.qk_norm == "head" else {})}
    if "sparse" in mlp_types:
        plan.update(_EXPERTS_TP_PLAN)
        if config.shared_expert_intermediate_size > 0:
            plan.update(_SHARED_EXPERT_TP_PLAN)
    if "dense" in mlp_types:
        plan.update(_DENSE_MLP_TP_PLAN)
    return {f"layers.*.{name}": style for name, style in plan.items()}


def tp_plan_for(config: Any) -> dict[str, str]:
    """The decoder stack's tensor-parallel plan (`base_model_tp_plan`): Qwen3-MoE's (q/k/v colwise, o rowwise,
    per-head q/k norms replicated with their gradient summed, fused experts sharded on their FFN width) plus the
    shared expert and, with `qk_norm="full"`, OLMoE's gathered attention. Only entries that name a module of this
    config, so transformers warns about none; `embed_tokens` is sharded by transformers on its own."""
    return _block_tp_plan(config, set(config.mlp_layer_types))


def mtp_tp_plan_for(config: Any) -> dict[str, str]:
    """The tensor-parallel plan of the MTP depths (`mtp.layers.*`, sparse decoder blocks): the decoder blocks' plus
    `eh_proj`, whose replicated `[embedding, hidden]` input is split between the ranks and summed."""
    return {**_block_tp_plan(config, {"sparse"}), "layers.*.eh_proj": "rowwise_split_input"}


def _mtp_width(widths: list[int], mlp_layer_types: list[str] | None) -> int:
    sparse = [w for w, kind in zip(widths, mlp_layer_types or ["sparse"] * len(widths)) if kind == "sparse"]
    return max(sparse or widths)


__all__ = ["SlimMoeConfig"]
