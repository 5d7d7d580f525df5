# Copyright 2026 The hf-slim developers. Licensed under the Apache License, Version 2.0.
"""SlimMoe: Qwen3-MoE-style decoder with multi-token-prediction heads.

This file is copied next to the weights by `hf_slim.hub.save_for_hub` and must import only transformers/torch
(plus its sibling configuration file), so that `trust_remote_code=True` loading works without hf_slim installed.
Building blocks that transformers already ships (RoPE, RMSNorm, attention kernels, the experts kernels behind
`@use_experts_implementation`, the load-balancing loss) are reused rather than rewritten.
"""

import contextlib
import ctypes
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from safetensors import safe_open
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
from transformers.generation import GenerationConfig, GenerationMixin
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
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, cached_file
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_slim_moe import FULL_VARIANT, SlimMoeConfig


logger = logging.getLogger(__name__)


class SlimMoeRMSNorm(Qwen3MoeRMSNorm):
    """RMSNorm computing `weight * x / rms(x)` in float32 (identical to Qwen3-MoE's)."""


# ---- elastic (nested) variants: prefix views of the full tensors ---------------------------------------------------
# A variant keeps a prefix of every axis (make_elastic orders each axis by importance first). While a variant is
# active, modules carry its sizes in `_elastic*` attributes (None otherwise) and compute with slices of their own
# parameters: no copies, and gradients land in the shared tensors.


@dataclass(frozen=True)
class SlimMoeElasticSizes:
    """Sizes one block computes with while an elastic variant is active (widths in elements, not heads)."""

    hidden: int
    q_width: int
    kv_width: int
    num_experts: int
    top_k: int
    expert_ffn: int
    shared_ffn: int
    ffn: int
    cache_index: int


def _rms_norm(norm: nn.Module, hidden_states: torch.Tensor, width: int) -> torch.Tensor:
    """`norm` restricted to its first `width` channels: what a variant of that width computes."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight[:width] * hidden_states.to(input_dtype)


def _prefix_linear(layer: nn.Linear, x: torch.Tensor, rows: int) -> torch.Tensor:
    bias = layer.bias[:rows] if layer.bias is not None else None
    return F.linear(x, layer.weight[:rows, : x.shape[-1]], bias)


def _elastic_experts(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    width: int,
) -> torch.Tensor:
    """The eager experts loop over views: gate rows `[:width]`, up rows `[I:I+width]`, down columns `[:width]`."""
    full = experts.intermediate_dim
    hidden = hidden_states.shape[-1]
    output = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current = hidden_states[token_idx]
        gate = F.linear(current, experts.gate_up_proj[expert_idx, :width, :hidden])
        up = F.linear(current, experts.gate_up_proj[expert_idx, full : full + width, :hidden])
        current = F.linear(experts.act_fn(gate) * up, experts.down_proj[expert_idx, :hidden, :width])
        current = current * top_k_weights[token_idx, top_k_pos, None]
        output.index_add_(0, token_idx, current.to(output.dtype))
    return output


class SlimMoeRotaryEmbedding(Qwen3MoeRotaryEmbedding):
    """RoPE tables built from `config.rope_parameters` (identical to Qwen3-MoE's)."""


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
        self._elastic: SlimMoeElasticSizes | None = None
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
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        elastic = self._elastic
        if elastic is None:
            query = self.q_proj(hidden_states)
            key = self.k_proj(hidden_states)
            value = self.v_proj(hidden_states)
        else:
            query = _prefix_linear(self.q_proj, hidden_states, elastic.q_width)
            key = _prefix_linear(self.k_proj, hidden_states, elastic.kv_width)
            value = _prefix_linear(self.v_proj, hidden_states, elastic.kv_width)
        qk_norm = self.config.qk_norm
        if qk_norm == "full" and elastic is None:
            query, key = self.q_norm(query), self.k_norm(key)
        elif qk_norm == "full":
            query, key = _rms_norm(self.q_norm, query, elastic.q_width), _rms_norm(self.k_norm, key, elastic.kv_width)
        if self.config.clip_qkv is not None:
            clip = self.config.clip_qkv
            query, key, value = query.clamp(-clip, clip), key.clamp(-clip, clip), value.clamp(-clip, clip)
        query, key, value = query.view(hidden_shape), key.view(hidden_shape), value.view(hidden_shape)
        if qk_norm == "head":
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(
                key, value, self.layer_idx if elastic is None else elastic.cache_index, kwargs=kwargs
            )

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
        if elastic is not None:
            return _prefix_linear(self.o_proj, attn_output, elastic.hidden), attn_weights
        return self.o_proj(attn_output), attn_weights


class SlimMoeMLP(nn.Module):
    """Gated FFN used for dense layers and for the shared expert."""

    def __init__(self, config: SlimMoeConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self._elastic_width: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self._elastic_width
        if width is None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        hidden = x.shape[-1]
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
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            output.index_add_(0, token_idx, current.to(output.dtype))
        return output


class SlimMoeTopKRouter(nn.Module):
    """Softmax router: probabilities over all experts, keep the top-k, optionally renormalise them."""

    def __init__(self, config: SlimMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        self._elastic: SlimMoeElasticSizes | None = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weight, top_k, hidden_dim = self.weight, self.top_k, self.hidden_dim
        if self._elastic is not None:
            top_k, hidden_dim = self._elastic.top_k, self._elastic.hidden
            weight = weight[: self._elastic.num_experts, :hidden_dim]
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        router_logits = F.linear(hidden_states, weight)
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(router_probs, top_k, dim=-1)
        if self.norm_topk_prob:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value.to(router_logits.dtype), top_index


class SlimMoeSparseMoeBlock(nn.Module):
    """Routed experts plus an optional shared expert scaled by `sigmoid(shared_expert_gate(x))` (Qwen2-MoE)."""

    def __init__(self, config: SlimMoeConfig, layer_idx: int = 0):
        super().__init__()
        self.gate = SlimMoeTopKRouter(config)
        self.experts = SlimMoeExperts(config, config.expert_intermediate_size(layer_idx))
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = SlimMoeMLP(config, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None
        self._elastic: SlimMoeElasticSizes | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat = hidden_states.view(-1, hidden_dim)
        _, routing_weights, selected_experts = self.gate(flat)
        elastic = self._elastic
        if elastic is None:
            output = self.experts(flat, selected_experts, routing_weights)
            if self.shared_expert is not None:
                output = output + F.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
            return output.reshape(batch_size, sequence_length, hidden_dim)
        output = _elastic_experts(
            self.experts, flat, selected_experts, routing_weights, elastic.num_experts, elastic.expert_ffn
        )
        if self.shared_expert is not None and elastic.shared_ffn > 0:
            gate = F.linear(flat, self.shared_expert_gate.weight[:, :hidden_dim])
            output = output + F.sigmoid(gate) * self.shared_expert(flat)
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
        self._elastic_hidden: int | None = None
        self._elastic_sizes: SlimMoeElasticSizes | None = None

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
            The sizes this call computes with. Callers pass the block's sizes at call time, so a gradient-checkpointing
            recompute (which replays the call after the `elastic_variant` context has exited) uses the same variant.
        """
        if elastic_sizes is not self._elastic_sizes:
            previous = self._elastic_sizes
            self._set_elastic(elastic_sizes)
            try:
                return self._block(hidden_states, attention_mask, position_ids, cache, use_cache,
                                   position_embeddings, **kwargs)
            finally:
                self._set_elastic(previous)
        return self._block(hidden_states, attention_mask, position_ids, cache, use_cache,
                           position_embeddings, **kwargs)

    def _block(self, hidden_states, attention_mask, position_ids, cache, use_cache, position_embeddings,
               **kwargs) -> torch.Tensor:
        width = self._elastic_hidden
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states)
            if width is None
            else _rms_norm(self.input_layernorm, hidden_states, width),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        if width is None:
            hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        else:
            hidden_states = self.mlp(_rms_norm(self.post_attention_layernorm, hidden_states, width))
        return residual + hidden_states

    def _set_elastic(self, sizes: SlimMoeElasticSizes | None) -> None:
        self._elastic_sizes = sizes
        self._elastic_hidden = None if sizes is None else sizes.hidden
        self.self_attn._elastic = sizes
        if isinstance(self.mlp, SlimMoeSparseMoeBlock):
            self.mlp._elastic = self.mlp.gate._elastic = sizes
            if self.mlp.shared_expert is not None:
                self.mlp.shared_expert._elastic_width = None if sizes is None else sizes.shared_ffn
        else:
            self.mlp._elastic_width = None if sizes is None else sizes.ffn


class SlimMoePreTrainedModel(PreTrainedModel):
    config: SlimMoeConfig
    config_class = SlimMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SlimMoeDecoderLayer"]
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

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # torch's grouped_mm (transformers' default experts kernel) needs every row stride to be a multiple of 16
        # bytes; pruned or sliced widths need not be. Default to batched_mm then instead of failing at run time.
        if requested_experts is None:
            config = self.config
            widths = config.moe_intermediate_size if isinstance(config.moe_intermediate_size, list) else [
                config.moe_intermediate_size
            ]
            if any(width % 8 for width in [config.hidden_size, *widths]):
                requested_experts = "batched_mm"
        return super().get_correct_experts_implementation(requested_experts)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        # transformers only reports size mismatches in a log table; check local checkpoints first so the error
        # itself names the tensor and both shapes.
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder", "") or "")
        if os.path.isdir(folder) and not kwargs.get("ignore_mismatched_sizes", False):
            config = kwargs.get("config")
            if not isinstance(config, SlimMoeConfig):
                config = SlimMoeConfig.from_pretrained(folder)
            check_checkpoint_shapes(cls, config, folder)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SlimMoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, SlimMoeTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)


def check_checkpoint_shapes(model_class: type, config: SlimMoeConfig, folder: str) -> None:
    """Raise `ValueError` naming the first checkpoint tensor whose shape differs from what `config` builds."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        return
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}
    prefix = f"{model_class.base_model_prefix}."
    for file in files:
        with safe_open(os.path.join(folder, file), framework="pt") as handle:
            for name in handle.keys():
                key = name if name in expected or prefix + name not in expected else prefix + name
                if key not in expected:
                    continue
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != expected[key]:
                    raise ValueError(
                        f"Checkpoint tensor {name!r} in {file} has shape {list(shape)} but the config in {folder} "
                        f"builds {list(expected[key])}; the weights and config.json disagree (fix config.json, or "
                        "pass ignore_mismatched_sizes=True to re-initialise mismatched tensors)."
                    )


# ---- slicing a variant out of a tensor source (an in-memory state dict or safetensors slices) -----------------------
# Tensors whose dim 1 holds an axis twice, back to back: experts' gate then up rows, MTP fc's embedding then hidden half.
_TWO_PART_DIM1 = ("experts.gate_up_proj", "mtp.fc.weight")


def elastic_source_name(name: str, layers: list[int]) -> str:
    """The full model's name of a variant's tensor: decoder layer `j` of the variant is layer `layers[j]`."""
    if name.startswith("model.layers."):
        index, rest = name[len("model.layers.") :].split(".", 1)
        return f"model.layers.{layers[int(index)]}.{rest}"
    return name


def elastic_ranges(name: str, shape: tuple[int, ...], source_shape: tuple[int, ...]) -> tuple[list[tuple[int, int]], ...]:
    """Per dim, the `(start, stop)` ranges of the full tensor that make up the variant's tensor `name` of `shape`:
    the prefix of the dim, or the prefix of each of its fused parts."""
    if len(shape) != len(source_shape):
        raise ValueError(f"elastic variant tensor {name} {list(shape)} does not fit the source {list(source_shape)}.")
    ranges = []
    for dim, (size, full) in enumerate(zip(shape, source_shape)):
        parts = 2 if dim == 1 and name.endswith(_TWO_PART_DIM1) else 1
        if size > full or size % parts or full % parts:
            raise ValueError(f"elastic variant tensor {name} {list(shape)} does not fit the source {list(source_shape)}.")
        part, keep = full // parts, size // parts
        ranges.append([(p * part, p * part + keep) for p in range(parts)] if size != full else [(0, full)])
    return tuple(ranges)


def _slice_tensor(source, ranges: tuple[list[tuple[int, int]], ...], copy: bool = True) -> torch.Tensor:
    """Read the ranges from an in-memory tensor, one slice per part; `copy` clones a single slice (else a view)."""
    split = next((d for d, r in enumerate(ranges) if len(r) > 1), None)
    if split is None:
        out = torch.as_tensor(source[tuple(slice(*r[0]) for r in ranges)])
        return out.clone() if copy else out
    pieces = []
    for part in ranges[split]:
        index = tuple(slice(*part) if d == split else slice(*r[0]) for d, r in enumerate(ranges))
        pieces.append(torch.as_tensor(source[index]))
    return torch.cat(pieces, dim=split)


# ---- reading byte ranges of safetensors files (partial loading) -----------------------------------------------------
# The safetensors layout is public: 8-byte little-endian header length, a JSON header mapping each tensor to its
# `dtype`, `shape` and `data_offsets` (relative to the end of the header), then the raw row-major little-endian data.
# Partial loading reads the needed byte ranges with plain file reads straight into the destination tensor's buffer,
# so no page of a full tensor is ever mapped into the process.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _dtype in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _dtype):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _dtype)


def _safetensors_header(path: str) -> tuple[dict, int]:
    """`({tensor name: {"dtype", "shape", "data_offsets"}}, absolute offset of the data section)` of one file."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file: it is shorter than the 8-byte header length.")
        length = int.from_bytes(head, "little")
        if length > os.path.getsize(path) - 8:
            raise ValueError(f"{path} is not a safetensors file: header length {length} exceeds the file size.")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _tensor_runs(
    shape: tuple[int, ...], ranges: tuple[list[tuple[int, int]], ...], itemsize: int
) -> list[tuple[int, int]]:
    """`(source byte offset, byte count)` runs that, read back to back, give the sub-tensor of a row-major tensor of
    `shape` made of `ranges` per dim (see `elastic_ranges`); runs adjacent in the source are coalesced."""
    # dims after `inner` are kept whole, so each index of the dims up to `inner` reads one contiguous block
    inner = max((d for d, r in enumerate(ranges) if r != [(0, shape[d])]), default=-1)
    if inner < 0:
        total = itemsize
        for size in shape:
            total *= size
        return [(0, total)] if total else []
    strides = [itemsize] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    outer = [0]
    for d in range(inner):
        outer = [base + i * strides[d] for base in outer for start, stop in ranges[d] for i in range(start, stop)]
    runs: list[tuple[int, int]] = []
    for base in outer:
        for start, stop in ranges[inner]:
            offset, count = base + start * strides[inner], (stop - start) * strides[inner]
            if not count:
                continue
            if runs and runs[-1][0] + runs[-1][1] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + count)
            else:
                runs.append((offset, count))
    return runs


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from file offset `offset` (looping over short reads); returns the bytes read."""
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv (Windows)
            os.lseek(fd, offset + done, os.SEEK_SET)
            got = os.readv(fd, [view[done:]])
        if got <= 0:
            raise OSError(f"unexpected end of file at offset {offset + done} while reading {len(view)} bytes")
        done += got
    return done


def _read_safetensors_ranges(
    path: str, header: dict, data_start: int, name: str, shape: tuple[int, ...], fd: int
) -> tuple[torch.Tensor, int, int]:
    """Read variant tensor `name` of `shape` (prefix ranges, see `elastic_ranges`) from an open safetensors file.

    Returns `(tensor, bytes read, number of reads)`.
    """
    entry = header[name]
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(
            f"{path}: tensor {name!r} has dtype {entry['dtype']!r}; partial loading reads {sorted(_SAFETENSORS_DTYPES)}."
        )
    if sys.byteorder != "little":  # pragma: no cover
        raise ValueError("partial loading of safetensors files needs a little-endian machine.")
    dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
    source_shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    ranges = elastic_ranges(name, shape, source_shape)
    out = torch.empty(shape, dtype=dtype)
    itemsize = out.element_size()
    expected = itemsize
    for size in source_shape:
        expected *= size
    if end - begin != expected:
        raise ValueError(f"{path}: tensor {name!r} has {end - begin} data bytes, its dtype and shape need {expected}.")
    if not out.numel():
        return out, 0, 0
    buffer = memoryview((ctypes.c_char * (out.numel() * itemsize)).from_address(out.data_ptr())).cast("B")
    position = reads = 0
    for offset, count in _tensor_runs(source_shape, ranges, itemsize):
        position += _pread_into(fd, buffer[position : position + count], data_start + begin + offset)
        reads += 1
    return out, position, reads


def _build_variant(
    model_class: type,
    config: SlimMoeConfig,
    name: str,
    read: Callable[[str, tuple[int, ...]], torch.Tensor | None],
) -> "SlimMoePreTrainedModel":
    """Instantiate variant `name` on the meta device and fill it with prefixes of the full tensors.

    `read(full_name, variant_shape)` returns the variant's tensor (see `elastic_ranges`), or `None` when the source
    lacks a tensor the variant ties to another one.
    """
    sizes = config.elastic_variant_sizes(name)
    variant = config.variant_config(name)
    variant._attn_implementation = config._attn_implementation
    with torch.device("meta"):
        model = model_class(variant)
    tied = set(model._tied_weights_keys or {}) if variant.tie_word_embeddings else set()
    tensors = {}
    for key, meta in model.state_dict().items():
        if key in tied:
            continue
        tensor = read(elastic_source_name(key, sizes["layers"]), tuple(meta.shape))
        if tensor is None:
            raise ValueError(f"elastic variant {name!r}: the source has no tensor {elastic_source_name(key, sizes['layers'])!r}.")
        tensors[key] = tensor
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"elastic variant {name!r}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}.")
    if tied:
        model.tie_weights()
    # non-persistent buffers (the RoPE tables) are rebuilt for the variant's config
    model.model.rotary_emb = SlimMoeRotaryEmbedding(config=variant)
    return model


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def _weight_map(path: str, hub_kwargs: dict) -> dict[str, str]:
    """Tensor name -> local safetensors file of a checkpoint (a folder or a Hub repo id)."""
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if index is not None:
        with open(index) as handle:
            names = json.load(handle)["weight_map"]
        files = {file: cached_file(path, file, **hub_kwargs) for file in set(names.values())}
        return {name: files[file] for name, file in names.items()}
    single = cached_file(path, "model.safetensors", **hub_kwargs)
    return dict.fromkeys(_safetensors_header(single)[0], single)


def load_elastic_variant(
    model_class: type, path: str | os.PathLike, name: str, **kwargs
) -> "SlimMoePreTrainedModel":
    """Load variant `name` of an elastic checkpoint, reading only its slices.

    The variant is built on the meta device; each of its tensors is allocated at the variant's size and filled with
    plain file reads (`os.preadv`) of exactly the byte ranges it needs, located through the safetensors header
    (adjacent ranges coalesced: a `[:d, :]` prefix is one read, `[:, :d]` one read per row). No page of a full
    tensor is mapped, so peak memory follows the variant's size. `model.elastic_load_report` records the bytes read
    and the number of reads.
    """
    hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    config = kwargs.pop("config", None)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    # what the Auto classes add on their own
    for key in [k for k in kwargs if k.startswith("_") or k in ("trust_remote_code", "use_safetensors")]:
        kwargs.pop(key)
    if "_adapter_model_path" in (kwargs.pop("adapter_kwargs", None) or {}):
        raise TypeError(f"from_pretrained(..., elastic_variant={name!r}) cannot load a PEFT adapter folder.")
    if kwargs:
        raise TypeError(
            f"from_pretrained(..., elastic_variant={name!r}) does not take {sorted(kwargs)}; it takes config, dtype "
            f"and the Hub arguments {list(_HUB_KWARGS)} (move the model afterwards with .to())."
        )
    path = str(path)
    if not isinstance(config, SlimMoeConfig):
        config = SlimMoeConfig.from_pretrained(path, **hub_kwargs)
    weight_map = _weight_map(path, hub_kwargs)
    report = {"variant": name, "bytes_read": 0, "tensors_read": 0, "reads": 0}
    headers: dict[str, tuple[dict, int]] = {}
    files: dict[str, int] = {}

    def read(source: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        if source not in weight_map:
            return None
        file = weight_map[source]
        if file not in files:
            headers[file] = _safetensors_header(file)
            files[file] = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        tensor, count, reads = _read_safetensors_ranges(file, *headers[file], source, shape, files[file])
        report["bytes_read"] += count
        report["reads"] += reads
        report["tensors_read"] += 1
        return tensor

    try:
        model = _build_variant(model_class, config, name, read)
    finally:
        for fd in files.values():
            os.close(fd)
    if dtype is not None and dtype != "auto":
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    report["checkpoint_bytes"] = sum(os.path.getsize(f) for f in set(weight_map.values()))
    model.elastic_load_report = report
    try:
        model.generation_config = GenerationConfig.from_pretrained(path, **hub_kwargs)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    logger.info("loaded elastic variant %r: %d bytes read of %d", name, report["bytes_read"], report["checkpoint_bytes"])
    return model.eval()


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
        # set by SlimMoeForCausalLM.elastic_variant: (kept layer indices, hidden width, variant config)
        self._elastic: tuple[list[int], int, SlimMoeConfig] | None = None
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
        elastic = self._elastic
        if inputs_embeds is None and elastic is None:
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds is None:
            inputs_embeds = F.embedding(input_ids, self.embed_tokens.weight[:, : elastic[1]], self.padding_idx)
        _refuse_stateful_kwargs(kwargs)
        if use_cache and cache is None:
            # a variant numbers its cache layers 0..n-1 over the layers it keeps
            cache = DynamicCache(config=self.config if elastic is None else elastic[2])
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if not isinstance(mask_mapping := attention_mask, dict):
            mask_mapping = _causal_masks(self.config, inputs_embeds, attention_mask, cache, position_ids)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        layers = range(self.config.num_hidden_layers) if elastic is None else elastic[0]
        for i in layers:
            decoder_layer = self.layers[i]
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask_mapping[self.config.layer_types[i]],
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                elastic_sizes=decoder_layer._elastic_sizes,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states) if elastic is None else _rms_norm(self.norm, hidden_states, elastic[1])
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


def _wants_static_cache(generation_config, default_config, kwargs: dict) -> bool:
    """Whether `generate` will build a compilable cache itself (then a variant must not get a dynamic one)."""
    implementation = kwargs.get("cache_implementation")
    for config in (generation_config, default_config):
        if implementation is None and config is not None:
            implementation = getattr(config, "cache_implementation", None)
    return implementation is not None and implementation != "dynamic"


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


class SlimMoeMultiTokenPredictor(nn.Module):
    """Multi-token-prediction heads, DeepSeek-V3 / Qwen3-Next style.

    Depth k (1-based) combines the previous depth's hidden state at position i with the embedding of token i+k:
    `h^k_i = layers[k-1](fc(cat[pre_fc_norm_embedding(emb(t_{i+k})), pre_fc_norm_hidden(h^{k-1}_i)]))`, and predicts
    token i+k+1 through `norm` and the model's shared `lm_head`. `h^0` is the main model's final hidden state.
    `fc`, the two input norms and `norm` are shared by all depths; each depth has its own block. The names (`mtp.fc`,
    `mtp.layers.N`, ...) are hf-slim's own: no inference engine is known to load this layout as it is.
    """

    def __init__(self, config: SlimMoeConfig):
        super().__init__()
        self.num_heads = config.num_mtp_heads
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.pre_fc_norm_embedding = SlimMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = SlimMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(
            [
                SlimMoeDecoderLayer(config, config.num_hidden_layers + k, mlp_type="sparse")
                for k in range(config.num_mtp_heads)
            ]
        )
        self.norm = SlimMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._elastic_hidden: int | None = None

    def _fuse(self, embedding: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        width = self._elastic_hidden
        if width is None:
            return self.fc(torch.cat([self.pre_fc_norm_embedding(embedding), self.pre_fc_norm_hidden(hidden)], dim=-1))
        # fc's input holds the embedding half then the hidden half: two prefix views instead of one concatenation
        half = self.fc.in_features // 2
        embedding = _rms_norm(self.pre_fc_norm_embedding, embedding, width)
        hidden = _rms_norm(self.pre_fc_norm_hidden, hidden, width)
        return F.linear(embedding, self.fc.weight[:width, :width]) + F.linear(
            hidden, self.fc.weight[:width, half : half + width]
        )

    def forward(
        self,
        config: SlimMoeConfig,
        rotary_emb: SlimMoeRotaryEmbedding,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
    ) -> list[torch.Tensor]:
        """Returns one normed hidden-state tensor per depth; depth k has sequence length `T - k`."""
        outputs = []
        seq_len = hidden_states.shape[1]
        previous = hidden_states
        for k, layer in enumerate(self.layers, start=1):
            length = seq_len - k
            if length <= 0:
                break
            fused = self._fuse(inputs_embeds[:, k:], previous[:, :length])
            positions = position_ids[..., :length]
            padding = attention_mask[:, :length] if attention_mask is not None and attention_mask.dim() == 2 else None
            mask = create_causal_mask(
                config=config, inputs_embeds=fused, attention_mask=padding, cache=None, position_ids=positions
            )
            previous = layer(
                fused,
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=rotary_emb(fused, positions),
                elastic_sizes=layer._elastic_sizes,
            )
            width = self._elastic_hidden
            outputs.append(self.norm(previous) if width is None else _rms_norm(self.norm, previous, width))
        return outputs


@dataclass
class SlimMoeCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    lm_loss (`torch.FloatTensor`, *optional*): Next-token cross-entropy of the main head (given `labels`).
    mtp_losses (`tuple[torch.FloatTensor]`, *optional*): Cross-entropy of each MTP depth k against token i+k+1.
    mtp_hidden_states (`tuple[torch.FloatTensor]`, *optional*): Normed hidden states of each MTP depth,
        `[batch, seq_len - k, hidden]`; feed them to `lm_head` (or a chunked loss) for depth-k predictions.
    mtp_logits (`tuple[torch.FloatTensor]`, *optional*): `lm_head` of `mtp_hidden_states` (given labels or
        `return_mtp_logits=True`).
    """

    lm_loss: torch.FloatTensor | None = None
    mtp_losses: tuple[torch.FloatTensor, ...] | None = None
    mtp_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    mtp_logits: tuple[torch.FloatTensor, ...] | None = None


class SlimMoeForCausalLM(SlimMoePreTrainedModel, GenerationMixin):
    """SlimMoe decoder with a language-model head and `config.num_mtp_heads` multi-token-prediction depths.

    With `labels`, `loss = lm_loss + mtp_loss_weight * mean(mtp_losses) + router_aux_loss_coef * aux_loss` (the aux
    term only when router logits are requested); each term is also returned on its own.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: SlimMoeConfig):
        super().__init__(config)
        self.model = SlimMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = SlimMoeMultiTokenPredictor(config) if config.num_mtp_heads > 0 else None
        self.post_init()

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
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=cache,
                    inputs_embeds=inputs_embeds,
                    labels=labels,
                    use_cache=use_cache,
                    output_router_logits=output_router_logits,
                    logits_to_keep=logits_to_keep,
                    return_mtp=return_mtp,
                    return_mtp_logits=return_mtp_logits,
                    **kwargs,
                )
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        elastic = self.model._elastic
        if inputs_embeds is None and input_ids is not None:
            if elastic is None:
                inputs_embeds = self.model.embed_tokens(input_ids)
            else:
                weight = self.model.embed_tokens.weight[:, : elastic[1]]
                inputs_embeds = F.embedding(input_ids, weight, self.model.padding_idx)
        elif elastic is not None and inputs_embeds is not None:
            inputs_embeds = inputs_embeds[..., : elastic[1]]
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
                self.mtp(self.config, self.model.rotary_emb, hidden_states, inputs_embeds, attention_mask, position_ids)
            )
            if return_mtp_logits or (return_mtp_logits is None and labels is not None):
                mtp_logits = tuple(self._logits(h) for h in mtp_hidden)
            if labels is not None and mtp_logits:
                mtp_losses = tuple(self._mtp_loss(lg, labels, k, kwargs) for k, lg in enumerate(mtp_logits, start=1))
                loss = loss + self.config.mtp_loss_weight * torch.stack(mtp_losses).mean()

        if output_router_logits:
            sizes = self.config if elastic is None else elastic[2]
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
            reads of its byte ranges (nothing memory-mapped), so memory follows the variant's size. Takes `config`, `dtype` and the Hub
            arguments; the model's config is `config.variant_config(elastic_variant)`.
        """
        if elastic_variant is None or elastic_variant == FULL_VARIANT:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if model_args:
            raise TypeError("from_pretrained(..., elastic_variant=...) takes no extra positional arguments.")
        return load_elastic_variant(cls, pretrained_model_name_or_path, elastic_variant, **kwargs)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, *args, elastic_budget=None, **kwargs):
        r"""
        `GenerationMixin.generate`, plus:

        elastic_variant (`str`, *optional*):
            Decode with this nested variant (its own KV cache layout is created for it).
        elastic_budget (`ElasticBudget`, *optional*):
            Budget-controlled generation: `think_variant` writes the thinking trace until it emits
            `end_think_token_id` or `max_thinking_tokens` run out (then the token is forced); `answer_variant` is then
            prefilled over prompt + thinking and writes the answer under the usual generation settings
            (`max_new_tokens` counts answer tokens). Greedy or sampled, any batch size; a streamer sees both phases.
            Returns the sequences, or with `return_dict_in_generate=True` an `ElasticGenerateOutput` with per-phase
            token counts and times (which are also logged at INFO level).
        """
        if elastic_budget is not None:
            return _generate_with_budget(self, inputs, generation_config, args, elastic_budget, kwargs)
        variant = kwargs.pop("elastic_variant", None) or self.active_elastic_variant
        if variant != FULL_VARIANT:
            kwargs["elastic_variant"] = variant
            user_cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if user_cache is None and kwargs.get("use_cache", True) is not False and not _wants_static_cache(
                generation_config, self.generation_config, kwargs
            ):
                kwargs["cache"] = DynamicCache(config=self._elastic_plan(variant)[1])
        return super().generate(inputs, generation_config, *args, **kwargs)

    def _logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.model._elastic is None:
            return self.lm_head(hidden_states)
        return F.linear(hidden_states, self.lm_head.weight[:, : hidden_states.shape[-1]])

    # ---- elastic variants ------------------------------------------------------------------------------------------
    def _elastic_plan(self, name: str) -> tuple[dict, SlimMoeConfig]:
        key = (name, json.dumps(self.config.elastic, sort_keys=True))
        cache = self.__dict__.setdefault("_elastic_plans", {})
        if key not in cache:
            cache[key] = (self.config.elastic_variant_sizes(name), self.config.variant_config(name))
        return cache[key]

    def _apply_elastic(self, name: str | None) -> None:
        if name is None or name == FULL_VARIANT:
            self.model._elastic = None
            for block in self._elastic_blocks():
                block._set_elastic(None)
            if self.mtp is not None:
                self.mtp._elastic_hidden = None
            self.__dict__["_active_elastic_variant"] = None
            return
        sizes, variant = self._elastic_plan(name)
        hidden, head_dim = sizes["hidden_size"], self.config.head_dim
        kept = {layer: position for position, layer in enumerate(sizes["layers"])}
        n_layers = self.config.num_hidden_layers
        for index, block in enumerate(self._elastic_blocks()):
            # expert width of the variant's own block: kept decoder layer `kept[index]`, or MTP block `k`
            position = kept.get(index, 0) if index < n_layers else variant.num_hidden_layers + index - n_layers
            block._set_elastic(
                SlimMoeElasticSizes(
                    hidden=hidden,
                    q_width=sizes["num_attention_heads"] * head_dim,
                    kv_width=sizes["num_key_value_heads"] * head_dim,
                    num_experts=sizes["num_experts"],
                    top_k=sizes["num_experts_per_tok"],
                    expert_ffn=variant.expert_intermediate_size(position),
                    shared_ffn=sizes["shared_expert_intermediate_size"],
                    ffn=sizes["intermediate_size"],
                    cache_index=kept.get(index, index),
                )
            )
        self.model._elastic = (sizes["layers"], hidden, variant)
        if self.mtp is not None:
            self.mtp._elastic_hidden = hidden
        self.__dict__["_active_elastic_variant"] = name

    def _elastic_blocks(self) -> list["SlimMoeDecoderLayer"]:
        return list(self.model.layers) + (list(self.mtp.layers) if self.mtp is not None else [])

    @property
    def active_elastic_variant(self) -> str:
        """The variant the model currently computes as (`"full"` outside `elastic_variant()`)."""
        return self.__dict__.get("_active_elastic_variant") or FULL_VARIANT

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
            `ValueError`: the model has no `config.elastic`.
        """
        previous = self.__dict__.get("_active_elastic_variant")
        self._apply_elastic(name)
        try:
            yield self
        finally:
            self._apply_elastic(previous)

    def slice_variant(self, name: str) -> "SlimMoeForCausalLM":
        """A standalone `SlimMoeForCausalLM` of variant `name`, holding copies of the prefixes of this model's tensors.

        Its config is `config.variant_config(name)` (so it stays elastic over the variants nested inside `name`) and
        its logits equal this model's under `elastic_variant(name)`.
        """
        state = self.state_dict()

        def read(source: str, shape: tuple[int, ...]) -> torch.Tensor:
            tensor = state[source]
            return _slice_tensor(tensor.detach(), elastic_ranges(source, shape, tuple(tensor.shape)))

        model = _build_variant(type(self), self.config, name, read)
        model.generation_config = GenerationConfig.from_dict(self.generation_config.to_dict())
        model.train(self.training)
        return model

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


@dataclass
class ElasticBudget:
    """Budget-controlled generation over two nested variants (see `SlimMoeForCausalLM.generate`).

    Args:
        think_variant (`str`): variant that writes the thinking trace (e.g. the smallest).
        end_think_token_id (`int`): token that closes the thinking trace (e.g. the id of `</think>`).
        max_thinking_tokens (`int`, defaults to 1024): thinking budget; when it runs out the end token is forced.
        answer_variant (`str`, defaults to `"full"`): variant that is prefilled over prompt + thinking and answers.
    """

    think_variant: str
    end_think_token_id: int
    max_thinking_tokens: int = 1024
    answer_variant: str = FULL_VARIANT

    def __post_init__(self):
        if isinstance(self.end_think_token_id, bool) or not isinstance(self.end_think_token_id, int):
            raise ValueError(f"ElasticBudget.end_think_token_id must be a token id (int), got {self.end_think_token_id!r}.")
        if isinstance(self.max_thinking_tokens, bool) or not isinstance(self.max_thinking_tokens, int) or (
            self.max_thinking_tokens < 1
        ):
            raise ValueError(f"ElasticBudget.max_thinking_tokens must be an integer >= 1, got {self.max_thinking_tokens!r}.")


@dataclass
class ElasticGenerateOutput(ModelOutput):
    r"""
    sequences (`torch.LongTensor` of shape `(batch_size, length)`): prompt + thinking (+ forced end token) + answer,
        left-padded per row.
    thinking_tokens (`torch.LongTensor` of shape `(batch_size,)`): tokens the think variant wrote (its own end
        token included, a forced one not).
    forced_end (`torch.BoolTensor` of shape `(batch_size,)`): rows whose end-of-thinking token was forced.
    answer_tokens (`torch.LongTensor` of shape `(batch_size,)`): tokens the answer variant wrote (up to and including
        EOS).
    thinking_seconds (`float`): wall time of the thinking phase.
    answer_seconds (`float`): wall time of the answer phase (prefill over prompt + thinking included).
    """

    sequences: torch.LongTensor | None = None
    thinking_tokens: torch.LongTensor | None = None
    forced_end: torch.BoolTensor | None = None
    answer_tokens: torch.LongTensor | None = None
    thinking_seconds: float | None = None
    answer_seconds: float | None = None


def _until(tokens: torch.Tensor, stop: set[int]) -> int:
    """Length of `tokens` up to and including the first token in `stop` (all of it when none occurs)."""
    for i, token in enumerate(tokens.tolist()):
        if token in stop:
            return i + 1
    return len(tokens)


def _generate_with_budget(model, inputs, generation_config, args, budget, kwargs) -> torch.Tensor | ElasticGenerateOutput:
    for attribute in ("think_variant", "answer_variant", "end_think_token_id", "max_thinking_tokens"):
        if not hasattr(budget, attribute):
            raise TypeError(f"elastic_budget must be an ElasticBudget, got {type(budget).__name__} without {attribute!r}.")
    end = budget.end_think_token_id
    if not 0 <= end < model.config.vocab_size:
        raise ValueError(
            f"ElasticBudget.end_think_token_id={end} is not in the vocabulary (ids 0..{model.config.vocab_size - 1}); "
            "pass the id of the end-of-thinking token, e.g. tokenizer.convert_tokens_to_ids('</think>')."
        )
    for variant in (budget.think_variant, budget.answer_variant):
        model.config.elastic_variant_sizes(variant)  # unknown names fail before any decoding
    input_ids = inputs if inputs is not None else kwargs.pop("input_ids")
    attention_mask = kwargs.pop("attention_mask", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    defaults = generation_config if generation_config is not None else model.generation_config
    return_dict = kwargs.pop("return_dict_in_generate", None)
    return_dict = defaults.return_dict_in_generate if return_dict is None else return_dict
    eos = kwargs.get("eos_token_id", defaults.eos_token_id)
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    pad = kwargs.pop("pad_token_id", defaults.pad_token_id)
    pad = pad if pad is not None else (min(eos) if eos else 0)

    think_kwargs = {k: v for k, v in kwargs.items() if k not in ("max_length", "min_length", "min_new_tokens")}
    think_kwargs.update(max_new_tokens=budget.max_thinking_tokens, eos_token_id=end, return_dict_in_generate=False)
    start = time.perf_counter()
    thought = model.generate(
        input_ids, generation_config, *args, attention_mask=attention_mask, pad_token_id=pad,
        elastic_variant=budget.think_variant, **think_kwargs,
    )
    thinking_seconds = time.perf_counter() - start
    written = thought[:, input_ids.shape[1] :]
    rows, thinking_tokens, forced = [], [], []
    for b in range(input_ids.shape[0]):
        prompt = input_ids[b][attention_mask[b].bool()]
        count = _until(written[b], {end})
        thinking = written[b, :count]
        forced.append(count == 0 or int(thinking[-1]) != end)
        if forced[-1]:
            thinking = torch.cat([thinking, thinking.new_tensor([end])])
        rows.append(torch.cat([prompt, thinking]))
        thinking_tokens.append(count)
    width = max(len(r) for r in rows)
    second_ids = input_ids.new_full((len(rows), width), pad)
    second_mask = torch.zeros_like(second_ids)
    for b, row in enumerate(rows):
        second_ids[b, width - len(row) :] = row
        second_mask[b, width - len(row) :] = 1
    start = time.perf_counter()
    answer = model.generate(
        second_ids, generation_config, *args, attention_mask=second_mask, pad_token_id=pad,
        elastic_variant=budget.answer_variant, return_dict_in_generate=False, **kwargs,
    )
    answer_seconds = time.perf_counter() - start
    answer_tokens = [_until(row, eos) for row in answer[:, width:]]
    logger.info(
        "elastic budget: thinking %s tokens with %r (%.3fs, forced end in %d rows), answer %s tokens with %r (%.3fs)",
        thinking_tokens, budget.think_variant, thinking_seconds, sum(forced), answer_tokens, budget.answer_variant,
        answer_seconds,
    )
    if not return_dict:
        return answer
    return ElasticGenerateOutput(
        sequences=answer,
        thinking_tokens=torch.tensor(thinking_tokens),
        forced_end=torch.tensor(forced),
        answer_tokens=torch.tensor(answer_tokens),
        thinking_seconds=thinking_seconds,
        answer_seconds=answer_seconds,
    )


__all__ = [
    "ElasticBudget",
    "ElasticGenerateOutput",
    "SlimMoeElasticSizes",
    "SlimMoeForCausalLM",
    "SlimMoeModel",
    "SlimMoePreTrainedModel",
]
