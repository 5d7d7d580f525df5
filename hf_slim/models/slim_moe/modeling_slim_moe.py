# Copyright 2026 The hf-slim developers. Licensed under the Apache License, Version 2.0.
"""SlimMoe: Qwen3-MoE-style decoder with multi-token-prediction heads (the model; its siblings `*_slim_moe.py` hold
the config, variant arithmetic, loading and generation).

Copied with its siblings next to the weights by `hf_slim.hub.save_for_hub`, so it imports only transformers/torch and
them: `trust_remote_code=True` loading works without hf_slim. Building blocks that transformers already ships (RoPE,
RMSNorm, attention kernels, the experts kernels of `@use_experts_implementation`, the load-balancing loss) are reused.
"""

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn


# This file also ships next to the weights as remote code, so it may meet any transformers. Before 5.24 the KV cache
# travelled as `past_key_values` and this code would decode with the cache ignored; refuse clearly instead.
MIN_TRANSFORMERS = "5.24.0"
if Version(transformers.__version__).release < Version(MIN_TRANSFORMERS).release:
    raise ImportError(
        f"SlimMoe's modeling code needs transformers>={MIN_TRANSFORMERS} (its `cache=` API); this environment has "
        f"transformers {transformers.__version__}. Upgrade with: pip install -U 'transformers>={MIN_TRANSFORMERS},<6'"
    )

from transformers import initialization as init  # noqa: E402  (after the version check, which explains failures)
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeRMSNorm,
    Qwen3MoeRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
    load_balancing_loss_func,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_slim_moe import SlimMoeConfig
from .generation_slim_moe import ElasticBudget, ElasticGenerateOutput, SlimMoeGenerationMixin
from .loading_slim_moe import check_pretrained_shapes, copy_variant, load_elastic_variant
from .routing_slim_moe import SlimMoeTopKRouter
from .mtp_slim_moe import (
    MTP_KEYS_PATTERN,
    MtpAcceptanceStats,
    SlimMoeMtpGenerationMixin,
    SlimMoeMtpLayerMixin,
    SlimMoeMultiTokenPredictor,
    converted_mtp_keys,
    converting_mtp_keys,
    finish_mtp_load,
    prepare_mtp_load,
)
from .variants_slim_moe import FULL_VARIANT, SlimMoeElasticSizes, SlimMoeVariantPlan, build_variant_plan


class SlimMoeRMSNorm(Qwen3MoeRMSNorm):
    """RMSNorm computing `weight * x / rms(x)` in float32 (identical to Qwen3-MoE's)."""


# ---- elastic (nested) variants: prefix views of the full tensors ---------------------------------------------------
# While a variant is active, `SlimMoeModel` holds its `SlimMoeVariantPlan` (None otherwise) and every module gets its
# block's `SlimMoeElasticSizes` as a call argument, computing with slices of its own parameters. A width or size of
# `None` below means the full module, called as a module (so hooks on it still fire).


def _rms_norm(norm: nn.Module, hidden_states: torch.Tensor, width: int | None) -> torch.Tensor:
    """`norm` restricted to its first `width` channels: what a variant of that width computes."""
    if width is None:
        return norm(hidden_states)
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight[:width] * hidden_states.to(input_dtype)


def _prefix_linear(layer: nn.Linear, x: torch.Tensor, rows: int | None) -> torch.Tensor:
    if rows is None:
        return layer(x)
    bias = layer.bias[:rows] if layer.bias is not None else None
    return F.linear(x, layer.weight[:rows, : x.shape[-1]], bias)


def _embed(embedding: nn.Embedding, input_ids: torch.Tensor, width: int | None) -> torch.Tensor:
    if width is None:
        return embedding(input_ids)
    return F.embedding(input_ids, embedding.weight[:, :width], embedding.padding_idx)


def _expert_loop(
    hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int,
    expert: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The eager experts loop: each token's sum of `weight * expert(index, tokens)` over its routed experts. Index
    `num_experts` is skipped: expert parallelism marks the routes to other ranks' experts with it."""
    output = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask[:num_experts].sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current = expert(expert_idx, hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
        output.index_add_(0, token_idx, current.to(output.dtype))
    return output


def _elastic_experts(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    sizes: SlimMoeElasticSizes,
) -> torch.Tensor:
    """The eager experts loop over views: gate rows `[:width]`, up rows `[I:I+width]`, down columns `[:width]`."""
    full, hidden, width = experts.intermediate_dim, hidden_states.shape[-1], sizes.expert_ffn

    def expert(index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        gate = F.linear(tokens, experts.gate_up_proj[index, :width, :hidden])
        up = F.linear(tokens, experts.gate_up_proj[index, full : full + width, :hidden])
        return F.linear(experts.act_fn(gate) * up, experts.down_proj[index, :hidden, :width])

    return _expert_loop(hidden_states, top_k_index, top_k_weights, sizes.num_experts, expert)


class SlimMoeRotaryEmbedding(Qwen3MoeRotaryEmbedding):
    """RoPE tables built from `config.rope_parameters` (Qwen3-MoE's; with `partial_rotary_factor` < 1, GLM-4-MoE's
    tables over the first `int(head_dim * partial_rotary_factor)` channels)."""

    @staticmethod
    def compute_default_rope_parameters(config: SlimMoeConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq.to(device), 1.0


def _apply_rotary(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE on the first `cos.shape[-1]` channels of each head (all of them unless the rotary is partial)."""
    rotary = cos.shape[-1]
    if rotary == query.shape[-1]:
        return apply_rotary_pos_emb(query, key, cos, sin)
    q_rot, k_rot = apply_rotary_pos_emb(query[..., :rotary], key[..., :rotary], cos, sin)
    return torch.cat([q_rot, query[..., rotary:]], dim=-1), torch.cat([k_rot, key[..., rotary:]], dim=-1)


class SlimMoeAttention(nn.Module):
    """GQA attention with optional per-head (Qwen3) or full-width (OLMoE) q/k RMSNorm, q/k/v clipping and biases."""

    def __init__(self, config: SlimMoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=config.attention_output_bias)
        if config.qk_norm == "head":
            self.q_norm = SlimMoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = SlimMoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = SlimMoeRMSNorm(q_width, eps=config.rms_norm_eps)
            self.k_norm = SlimMoeRMSNorm(kv_width, eps=config.rms_norm_eps)
        sliding = config.layer_types[layer_idx] == "sliding_attention" if layer_idx < len(config.layer_types) else False
        self.sliding_window = config.sliding_window if sliding else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        elastic_sizes: SlimMoeElasticSizes | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        sizes = elastic_sizes
        q_width, kv_width = (None, None) if sizes is None else (sizes.q_width, sizes.kv_width)
        query = _prefix_linear(self.q_proj, hidden_states, q_width)
        key = _prefix_linear(self.k_proj, hidden_states, kv_width)
        value = _prefix_linear(self.v_proj, hidden_states, kv_width)
        qk_norm = self.config.qk_norm
        if qk_norm == "full":
            query, key = _rms_norm(self.q_norm, query, q_width), _rms_norm(self.k_norm, key, kv_width)
        if self.config.clip_qkv is not None:
            clip = self.config.clip_qkv
            query, key, value = query.clamp(-clip, clip), key.clamp(-clip, clip), value.clamp(-clip, clip)
        query, key, value = query.view(hidden_shape), key.view(hidden_shape), value.view(hidden_shape)
        if qk_norm == "head":
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        cos, sin = position_embeddings
        query, key = _apply_rotary(query, key, cos, sin)
        if cache is not None:
            cache_index = self.layer_idx if sizes is None else sizes.cache_index
            key, value = cache.update(key, value, cache_index, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return _prefix_linear(self.o_proj, attn_output, None if sizes is None else sizes.hidden), attn_weights


class SlimMoeMLP(nn.Module):
    """Gated FFN used for dense layers and for the shared expert (`elastic_axis`: its field of `SlimMoeElasticSizes`,
    `"ffn"` or `"shared_ffn"`)."""

    def __init__(self, config: SlimMoeConfig, intermediate_size: int, elastic_axis: str = "ffn"):
        super().__init__()
        self.elastic_axis = elastic_axis
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, elastic_sizes: SlimMoeElasticSizes | None = None) -> torch.Tensor:
        if elastic_sizes is None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        width, hidden = getattr(elastic_sizes, self.elastic_axis), x.shape[-1]
        gate = F.linear(x, self.gate_proj.weight[:width, :hidden])
        up = F.linear(x, self.up_proj.weight[:width, :hidden])
        return F.linear(self.act_fn(gate) * up, self.down_proj.weight[:hidden, :width])


@use_experts_implementation
class SlimMoeExperts(nn.Module):
    """Routed experts as fused tensors in transformers' layout: `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`.

    `@use_experts_implementation` dispatches to transformers' kernels (`grouped_mm` by default, `batched_mm`); the
    forward below is the `"eager"` reference they are checked against.
    """

    def __init__(self, config: SlimMoeConfig, intermediate_size: int | None = None):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size if intermediate_size is None else intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return _expert_loop(hidden_states, top_k_index, top_k_weights, self.num_experts, self._expert)

    def _expert(self, index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(tokens, self.gate_up_proj[index]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[index])


class SlimMoeSparseMoeBlock(nn.Module):
    """Routed experts plus an optional shared expert, scaled by `sigmoid(shared_expert_gate(x))` (Qwen2-MoE) or, with
    `config.shared_expert_gated=False`, added as it is (GLM-4-MoE)."""

    def __init__(self, config: SlimMoeConfig, layer_idx: int = 0):
        super().__init__()
        self.gate = SlimMoeTopKRouter(config)
        self.experts = SlimMoeExperts(config, config.expert_intermediate_size(layer_idx))
        self.shared_expert = self.shared_expert_gate = None
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = SlimMoeMLP(config, config.shared_expert_intermediate_size, elastic_axis="shared_ffn")
            if config.shared_expert_gated:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor, elastic_sizes: SlimMoeElasticSizes | None = None) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat = hidden_states.view(-1, hidden_dim)
        _, routing_weights, selected_experts = self.gate(flat, elastic_sizes=elastic_sizes)
        sizes = elastic_sizes
        if sizes is None:
            output = self.experts(flat, selected_experts, routing_weights)
            if self.shared_expert_gate is not None:  # (this order of operations keeps the gradients bitwise)
                output = output + F.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
            elif self.shared_expert is not None:
                output = output + self.shared_expert(flat)
            return output.reshape(batch_size, sequence_length, hidden_dim)
        output = _elastic_experts(self.experts, flat, selected_experts, routing_weights, sizes)
        if self.shared_expert is not None and sizes.shared_ffn > 0:
            if self.shared_expert_gate is not None:
                gate = F.linear(flat, self.shared_expert_gate.weight[:, :hidden_dim])
                output = output + F.sigmoid(gate) * self.shared_expert(flat, elastic_sizes=sizes)
            else:
                output = output + self.shared_expert(flat, elastic_sizes=sizes)
        return output.reshape(batch_size, sequence_length, hidden_dim)


class SlimMoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: attention then a sparse (MoE) or dense FFN, each with a residual connection."""

    def __init__(self, config: SlimMoeConfig, layer_idx: int, mlp_type: str | None = None):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = SlimMoeAttention(config, layer_idx)
        mlp_type = mlp_type or config.mlp_layer_types[layer_idx]
        if mlp_type == "sparse":
            self.mlp = SlimMoeSparseMoeBlock(config, layer_idx)
        else:
            self.mlp = SlimMoeMLP(config, config.intermediate_size)
        self.input_layernorm = SlimMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = SlimMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        elastic_sizes: SlimMoeElasticSizes | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        r"""
        elastic_sizes (`SlimMoeElasticSizes`, *optional*):
            The sizes this call computes with (`None`: the full block). They travel as a call argument, so a
            gradient-checkpointing recompute (which replays the call after the `elastic_variant` context has exited)
            uses the same variant.
        """
        width = None if elastic_sizes is None else elastic_sizes.hidden
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=_rms_norm(self.input_layernorm, hidden_states, width),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            elastic_sizes=elastic_sizes,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = _rms_norm(self.post_attention_layernorm, hidden_states, width)
        hidden_states = self.mlp(hidden_states, elastic_sizes=elastic_sizes)
        return residual + hidden_states


class SlimMoePreTrainedModel(PreTrainedModel):
    config: SlimMoeConfig
    config_class = SlimMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SlimMoeDecoderLayer", "SlimMoeMtpLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(SlimMoeTopKRouter, index=0),
        "hidden_states": SlimMoeDecoderLayer,
        "attentions": SlimMoeAttention,
    }

    def post_init(self):
        # sigmoid routers compute in float32 (GLM-4-MoE's): a half-precision load keeps their weight and bias there
        if self.config.router_scoring == "sigmoid":
            self._keep_in_fp32_modules_strict = ["mlp.gate.weight", "e_score_correction_bias"]
        super().post_init()

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # torch's grouped_mm (transformers' default experts kernel) needs every row stride to be a multiple of 16
        # bytes; pruned or sliced widths need not be. Default to batched_mm then instead of failing at run time.
        if requested_experts is None:
            config = self.config
            widths = config.moe_intermediate_size
            if any(width % 8 for width in [config.hidden_size, *(widths if isinstance(widths, list) else [widths])]):
                requested_experts = "batched_mm"
        return super().get_correct_experts_implementation(requested_experts)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        # transformers only reports size mismatches in a log table; check local checkpoints first so the error
        # itself names the tensor and both shapes.
        check_pretrained_shapes(cls, pretrained_model_name_or_path, kwargs)
        # MTP tensors the config declares must be there; the old MTP layout is converted (see mtp_slim_moe.py)
        plan = prepare_mtp_load(cls, pretrained_model_name_or_path, kwargs)
        with converting_mtp_keys(plan):
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        finish_mtp_load(model, plan)
        return model

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SlimMoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, SlimMoeTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "e_score_correction_bias", None) is not None:
                init.zeros_(module.e_score_correction_bias)


class SlimMoeModel(SlimMoePreTrainedModel):
    """The decoder stack: embeddings, `num_hidden_layers` blocks and the final RMSNorm."""

    def __init__(self, config: SlimMoeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([SlimMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = SlimMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = SlimMoeRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        # The one place the active elastic variant lives (set by SlimMoeForCausalLM.elastic_variant; None: full).
        self._variant_plan: SlimMoeVariantPlan | None = None
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        plan = self._variant_plan
        width = None if plan is None else plan.hidden
        if inputs_embeds is None:
            inputs_embeds = _embed(self.embed_tokens, input_ids, width)
        _refuse_stateful_kwargs(kwargs)
        if use_cache and cache is None:
            # a variant numbers its cache layers 0..n-1 over the layers it keeps
            cache = DynamicCache(config=self.config if plan is None else plan.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if not isinstance(mask_mapping := attention_mask, dict):
            mask_mapping = _causal_masks(self.config, inputs_embeds, attention_mask, cache, position_ids)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        n_layers = self.config.num_hidden_layers
        blocks = zip(range(n_layers), [None] * n_layers) if plan is None else zip(plan.layers, plan.blocks)
        for i, sizes in blocks:
            hidden_states = self.layers[i](
                hidden_states,
                attention_mask=mask_mapping[self.config.layer_types[i]],
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                elastic_sizes=sizes,
                **kwargs,
            )
        hidden_states = _rms_norm(self.norm, hidden_states, width)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


# Names older or other transformers releases use for decoding state. A keyword the forward does not take ends up in
# `**kwargs`, which flows on to the attention kernels and is otherwise ignored: a cache passed under a name we do not
# read would silently turn cached decoding into per-token decoding (the transformers 5.24 `cache=` rename did that).
_STATE_KWARGS = ("past_key_values", "cache_params", "layer_past", "cache_position")


def _refuse_stateful_kwargs(kwargs: dict) -> None:
    """Raise `TypeError` for a keyword that carries decoding state SlimMoe would not read."""
    for key, value in kwargs.items():
        if key in _STATE_KWARGS or isinstance(value, Cache):
            raise TypeError(
                f"SlimMoe's forward got {key}={type(value).__name__}, which it does not read; pass the KV cache as "
                "`cache=` (positions come from `position_ids` or the cache's length)."
            )


def _causal_masks(config, inputs_embeds, attention_mask, cache, position_ids) -> dict:
    mask_kwargs = {
        "config": config,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "cache": cache,
        "position_ids": position_ids,
    }
    masks = {"full_attention": create_causal_mask(**mask_kwargs)}
    if "sliding_attention" in config.layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
    return masks


class SlimMoeMtpLayer(SlimMoeMtpLayerMixin, SlimMoeDecoderLayer):
    """MTP depth `depth`: a sparse decoder block plus transformers' per-depth MTP parts (`enorm`, `hnorm`, `eh_proj`,
    `post_norm`), called as transformers' `MtpLayer` (see `mtp_slim_moe.py`). Its experts take the widest sparse
    decoder layer's width; its attention is full and keeps its KV cache in slot `depth` of an `MtpCache`."""

    _prefix_norm = staticmethod(_rms_norm)

    def __init__(self, config: SlimMoeConfig, depth: int):
        SlimMoeDecoderLayer.__init__(self, config, config.num_hidden_layers + depth, mlp_type="sparse")
        self._init_mtp_parts(config, depth, SlimMoeRMSNorm)


def _refuse_sharded_variant(config: SlimMoeConfig, name: str) -> None:
    """Raise `ValueError` for a variant of a model sharded by tensor or expert parallelism: a variant is a
    prefix view of whole tensors, which a rank's shard is not (FSDP gathers whole tensors, so it is fine)."""
    distributed = getattr(config, "distributed_config", None)
    if name != FULL_VARIANT and distributed is not None and max(distributed.tp_size, distributed.ep_size) > 1:
        raise ValueError(
            f"Elastic variant {name!r} of a model sharded with tensor or expert parallelism: variants are prefix views "
            "of whole tensors. Slice the variant first (slice_variant + save_pretrained), then load that sharded."
        )


@dataclass
class SlimMoeCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    lm_loss (`torch.FloatTensor`, *optional*): Next-token cross-entropy of the main head (given `labels`).
    mtp_losses (`tuple[torch.FloatTensor]`, *optional*): Cross-entropy of each MTP depth k against token i+k+1.
    mtp_hidden_states (`tuple[torch.FloatTensor]`, *optional*): What the LM head reads of each MTP depth k (its
        `post_norm` output, which is also what depth k+1 takes; `mtp.norm` of its output with `mtp_shared_norm`),
        `[batch, seq_len - k, hidden]`; feed them to `lm_head` (or a chunked loss) for depth-k predictions. The same
        modules draft in `generate(use_mtp=True)`.
    mtp_logits (`tuple[torch.FloatTensor]`, *optional*): `lm_head` of `mtp_hidden_states` (given labels or
        `return_mtp_logits=True`).
    """

    lm_loss: torch.FloatTensor | None = None
    mtp_losses: tuple[torch.FloatTensor, ...] | None = None
    mtp_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    mtp_logits: tuple[torch.FloatTensor, ...] | None = None


class SlimMoeForCausalLM(SlimMoePreTrainedModel, SlimMoeMtpGenerationMixin, SlimMoeGenerationMixin):
    """SlimMoe decoder with a language-model head and `config.num_mtp_heads` multi-token-prediction depths, which
    `generate(..., use_mtp=True)` drafts with (transformers' MTP speculative decoding; acceptance in `mtp_stats`).

    With `labels`, `loss = lm_loss + mtp_loss_weight * mean(mtp_losses) + router_aux_loss_coef * aux_loss` (the aux
    term only when router logits are requested); each term is also returned on its own.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # where transformers' MtpModel.get_mtp_weights_regex looks for MTP tensors (they load with the model here)
    _keys_to_ignore_on_load_unexpected = [MTP_KEYS_PATTERN]
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: SlimMoeConfig):
        super().__init__(config)
        self.model = SlimMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = SlimMoeMultiTokenPredictor(config, SlimMoeMtpLayer, SlimMoeRMSNorm) if config.num_mtp_heads else None
        self.post_init()
        # tensors an old-layout checkpoint being loaded lacks by name, filled by finish_mtp_load
        self._keys_to_ignore_on_load_missing = {*(self._keys_to_ignore_on_load_missing or ()), *converted_mtp_keys()}

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_mtp: bool | None = None,
        return_mtp_logits: bool | None = None,
        elastic_variant: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SlimMoeCausalLMOutputWithPast:
        r"""
        return_mtp (`bool`, *optional*):
            Run the MTP heads and return `mtp_hidden_states`. Defaults to `True` when `labels` are given and the model
            has MTP heads (never during cached decoding).
        return_mtp_logits (`bool`, *optional*):
            Also return `mtp_logits`. Defaults to `True` when `labels` are given.
        elastic_variant (`str`, *optional*):
            Compute as this nested variant of `config.elastic` (prefix views of the shared tensors, see
            `elastic_variant()`); `inputs_embeds` may be given at the full width.
        """
        if elastic_variant is not None:
            with self.elastic_variant(elastic_variant):
                return self.forward(
                    input_ids, attention_mask, position_ids, cache, inputs_embeds, labels, use_cache,
                    output_router_logits, logits_to_keep, return_mtp, return_mtp_logits, **kwargs,
                )
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        plan = self.model._variant_plan
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = _embed(self.model.embed_tokens, input_ids, None if plan is None else plan.hidden)
        elif plan is not None and inputs_embeds is not None:
            inputs_embeds = inputs_embeds[..., : plan.hidden]
        outputs: MoeModelOutputWithPast = self.model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self._logits(slice_logits_to_keep(hidden_states, logits_to_keep))

        loss = lm_loss = aux_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            loss = lm_loss

        mtp_hidden = mtp_logits = mtp_losses = None
        if return_mtp is None:
            return_mtp = labels is not None
        if self.mtp is not None and return_mtp:
            if position_ids is None:
                position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
            mtp_hidden = tuple(
                self.mtp(
                    self.config, self.model.rotary_emb, hidden_states, inputs_embeds, attention_mask, position_ids, plan
                )
            )
            if return_mtp_logits or (return_mtp_logits is None and labels is not None):
                mtp_logits = tuple(self._logits(h) for h in mtp_hidden)
            if labels is not None and mtp_logits:
                mtp_losses = tuple(self._mtp_loss(lg, labels, k, kwargs) for k, lg in enumerate(mtp_logits, start=1))
                loss = loss + self.config.mtp_loss_weight * torch.stack(mtp_losses).mean()

        if output_router_logits:
            sizes = self.config if plan is None else plan.config
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, sizes.num_experts, sizes.num_experts_per_tok, attention_mask
            )
            if labels is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

        return SlimMoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            lm_loss=lm_loss,
            mtp_losses=mtp_losses,
            mtp_hidden_states=mtp_hidden,
            mtp_logits=mtp_logits,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, elastic_variant: str | None = None, **kwargs):
        r"""
        elastic_variant (`str`, *optional*):
            Load only this nested variant of an elastic checkpoint: each tensor's prefix is read with plain file
            reads of its byte ranges (nothing memory-mapped), so memory follows the variant's size. `dtype`,
            `device_map`, `low_cpu_mem_usage` and `quantization_config` act as on the variant's own checkpoint (see
            `load_elastic_variant`); the model's config is `config.variant_config(elastic_variant)`.
        """
        if elastic_variant is None or elastic_variant == FULL_VARIANT:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if model_args:
            raise TypeError("from_pretrained(..., elastic_variant=...) takes no extra positional arguments.")
        return load_elastic_variant(cls, pretrained_model_name_or_path, elastic_variant, **kwargs)

    def _logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.model._variant_plan is None:
            return self.lm_head(hidden_states)
        return F.linear(hidden_states, self.lm_head.weight[:, : hidden_states.shape[-1]])

    # ---- elastic variants ------------------------------------------------------------------------------------------
    def _plan_for(self, name: str) -> SlimMoeVariantPlan:
        _refuse_sharded_variant(self.config, name)
        # built once per variant and config.elastic (which make_elastic may set after construction)
        key = (name, json.dumps(self.config.elastic, sort_keys=True))
        plans = self.__dict__.setdefault("_variant_plans", {})
        if key not in plans:
            plans[key] = build_variant_plan(self.config, name)
        return plans[key]

    @property
    def active_elastic_variant(self) -> str:
        """The variant the model currently computes as (`"full"` outside `elastic_variant()`)."""
        plan = self.model._variant_plan
        return FULL_VARIANT if plan is None else plan.name

    @contextlib.contextmanager
    def elastic_variant(self, name: str) -> Iterator["SlimMoeForCausalLM"]:
        """Compute as the nested variant `name` inside the block.

        The variant runs on prefix views of this model's parameters (no copies), so its gradients land in the
        shared tensors and several variants can be trained jointly. Blocks nest; the previous variant is restored
        on exit.

        Example:
            ```python
            >>> with model.elastic_variant("small"):
            ...     loss = model(input_ids, labels=input_ids).loss
            ```

        Raises:
            `KeyError`: unknown `name` (the message lists the variants).
            `ValueError`: the model has no `config.elastic`, or is sharded with tensor or expert parallelism.
        """
        previous = self.model._variant_plan
        self.model._variant_plan = None if name == FULL_VARIANT else self._plan_for(name)
        try:
            yield self
        finally:
            self.model._variant_plan = previous

    def slice_variant(self, name: str) -> "SlimMoeForCausalLM":
        """A standalone `SlimMoeForCausalLM` of variant `name`, holding copies of the prefixes of this model's tensors.

        Its config is `config.variant_config(name)` (so it stays elastic over the variants nested inside `name`) and
        its logits equal this model's under `elastic_variant(name)`.
        """
        _refuse_sharded_variant(self.config, name)
        return copy_variant(self, name)

    def _mtp_loss(self, logits: torch.Tensor, labels: torch.Tensor, depth: int, kwargs: dict) -> torch.Tensor:
        # Depth k at position i predicts token i+k+1; positions past the end are ignored. With `shift_labels` (token
        # i+1 for position i, given under sequence/context parallelism where a rank holds a slice of the sequence)
        # that target is shift_labels[i+k]; rebuilding it from the local `labels` would shift it wrongly.
        length = logits.shape[1]
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is not None:
            targets = shift_labels[:, depth : depth + length]
        else:
            targets = labels[:, depth + 1 : depth + 1 + length]
        targets = F.pad(targets, (0, length - targets.shape[1]), value=-100).contiguous()
        return self.loss_function(
            logits, None, self.vocab_size, shift_labels=targets, num_items_in_batch=kwargs.get("num_items_in_batch")
        )


__all__ = [
    "ElasticBudget",
    "ElasticGenerateOutput",
    "MtpAcceptanceStats",
    "SlimMoeElasticSizes",
    "SlimMoeForCausalLM",
    "SlimMoeModel",
    "SlimMoeMtpLayer",
    "SlimMoePreTrainedModel",
    "SlimMoeVariantPlan",
]
