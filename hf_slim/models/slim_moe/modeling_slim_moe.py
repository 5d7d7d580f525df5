# Copyright 2026 The hf-slim developers. Licensed under the Apache License, Version 2.0.
"""SlimMoe: Qwen3-MoE-style decoder with multi-token-prediction heads.

This file is copied next to the weights by `hf_slim.hub.save_for_hub` and must import only transformers/torch
(plus its sibling configuration file), so that `trust_remote_code=True` loading works without hf_slim installed.
Building blocks that transformers already ships (RoPE, RMSNorm, attention kernels, the experts kernels behind
`@use_experts_implementation`, the load-balancing loss) are reused rather than rewritten.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
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
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_slim_moe import SlimMoeConfig


class SlimMoeRMSNorm(Qwen3MoeRMSNorm):
    """RMSNorm computing `weight * x / rms(x)` in float32 (identical to Qwen3-MoE's)."""


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
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states)
        key = self.k_proj(hidden_states)
        value = self.v_proj(hidden_states)
        qk_norm = self.config.qk_norm
        if qk_norm == "full":
            query, key = self.q_norm(query), self.k_norm(key)
        if self.config.clip_qkv is not None:
            clip = self.config.clip_qkv
            query, key, value = query.clamp(-clip, clip), key.clamp(-clip, clip), value.clamp(-clip, clip)
        query, key, value = query.view(hidden_shape), key.view(hidden_shape), value.view(hidden_shape)
        if qk_norm == "head":
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

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
        return self.o_proj(attn_output), attn_weights


class SlimMoeMLP(nn.Module):
    """Gated FFN used for dense layers and for the shared expert."""

    def __init__(self, config: SlimMoeConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation
class SlimMoeExperts(nn.Module):
    """Routed experts as fused tensors in transformers' layout: `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`.

    `@use_experts_implementation` dispatches to transformers' kernels (`grouped_mm` by default, `batched_mm`); the
    forward below is the `"eager"` reference they are checked against.
    """

    def __init__(self, config: SlimMoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
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

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value.to(router_logits.dtype), top_index


class SlimMoeSparseMoeBlock(nn.Module):
    """Routed experts plus an optional shared expert scaled by `sigmoid(shared_expert_gate(x))` (Qwen2-MoE)."""

    def __init__(self, config: SlimMoeConfig):
        super().__init__()
        self.gate = SlimMoeTopKRouter(config)
        self.experts = SlimMoeExperts(config)
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = SlimMoeMLP(config, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat = hidden_states.view(-1, hidden_dim)
        _, routing_weights, selected_experts = self.gate(flat)
        output = self.experts(flat, selected_experts, routing_weights)
        if self.shared_expert is not None:
            output = output + F.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return output.reshape(batch_size, sequence_length, hidden_dim)


class SlimMoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: attention then a sparse (MoE) or dense FFN, each with a residual connection."""

    def __init__(self, config: SlimMoeConfig, layer_idx: int, mlp_type: str | None = None):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = SlimMoeAttention(config, layer_idx)
        mlp_type = mlp_type or config.mlp_layer_types[layer_idx]
        if mlp_type == "sparse":
            self.mlp = SlimMoeSparseMoeBlock(config)
        else:
            self.mlp = SlimMoeMLP(config, config.intermediate_size)
        self.input_layernorm = SlimMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = SlimMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class SlimMoePreTrainedModel(PreTrainedModel):
    config: SlimMoeConfig
    config_class = SlimMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SlimMoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(SlimMoeTopKRouter, index=0),
        "hidden_states": SlimMoeDecoderLayer,
        "attentions": SlimMoeAttention,
    }

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
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if not isinstance(mask_mapping := attention_mask, dict):
            mask_mapping = _causal_masks(self.config, inputs_embeds, attention_mask, past_key_values, position_ids)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for i, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask_mapping[self.config.layer_types[i]],
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


def _causal_masks(config, inputs_embeds, attention_mask, past_key_values, position_ids) -> dict:
    mask_kwargs = {
        "config": config,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "past_key_values": past_key_values,
        "position_ids": position_ids,
    }
    masks = {"full_attention": create_causal_mask(**mask_kwargs)}
    if "sliding_attention" in config.layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
    return masks


class SlimMoeMultiTokenPredictor(nn.Module):
    """Multi-token-prediction heads in the Qwen3-Next / vLLM `qwen3_next_mtp` layout.

    Depth k (1-based) combines the previous depth's hidden state at position i with the embedding of token i+k:
    `h^k_i = layers[k-1](fc(cat[pre_fc_norm_embedding(emb(t_{i+k})), pre_fc_norm_hidden(h^{k-1}_i)]))`, and predicts
    token i+k+1 through `norm` and the model's shared `lm_head`. `h^0` is the main model's final hidden state.
    `fc`, the two input norms and `norm` are shared by all depths (as vLLM loads them); each depth has its own block.
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
            fused = self.fc(
                torch.cat(
                    [self.pre_fc_norm_embedding(inputs_embeds[:, k:]), self.pre_fc_norm_hidden(previous[:, :length])],
                    dim=-1,
                )
            )
            positions = position_ids[..., :length]
            padding = attention_mask[:, :length] if attention_mask is not None and attention_mask.dim() == 2 else None
            mask = create_causal_mask(
                config=config, inputs_embeds=fused, attention_mask=padding, past_key_values=None, position_ids=positions
            )
            previous = layer(
                fused,
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=rotary_emb(fused, positions),
            )
            outputs.append(self.norm(previous))
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
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_mtp: bool | None = None,
        return_mtp_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SlimMoeCausalLMOutputWithPast:
        r"""
        return_mtp (`bool`, *optional*):
            Run the MTP heads and return `mtp_hidden_states`. Defaults to `True` when `labels` are given and the model
            has MTP heads (never during cached decoding).
        return_mtp_logits (`bool`, *optional*):
            Also return `mtp_logits`. Defaults to `True` when `labels` are given.
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        outputs: MoeModelOutputWithPast = self.model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

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
                mtp_logits = tuple(self.lm_head(h) for h in mtp_hidden)
            if labels is not None and mtp_logits:
                mtp_losses = tuple(self._mtp_loss(lg, labels, k, kwargs) for k, lg in enumerate(mtp_logits, start=1))
                loss = loss + self.config.mtp_loss_weight * torch.stack(mtp_losses).mean()

        if output_router_logits:
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, self.config.num_experts, self.config.num_experts_per_tok, attention_mask
            )
            if labels is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

        return SlimMoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            lm_loss=lm_loss,
            mtp_losses=mtp_losses,
            mtp_hidden_states=mtp_hidden,
            mtp_logits=mtp_logits,
        )

    def _mtp_loss(self, logits: torch.Tensor, labels: torch.Tensor, depth: int, kwargs: dict) -> torch.Tensor:
        # Depth k at position i predicts token i+k+1; positions past the end are ignored.
        length = logits.shape[1]
        targets = labels[:, depth + 1 : depth + 1 + length]
        targets = F.pad(targets, (0, length - targets.shape[1]), value=-100)
        return self.loss_function(
            logits, None, self.vocab_size, shift_labels=targets, num_items_in_batch=kwargs.get("num_items_in_batch")
        )


__all__ = ["SlimMoeForCausalLM", "SlimMoeModel", "SlimMoePreTrainedModel"]
