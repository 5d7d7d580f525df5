"""Tiny in-test models and real calibration text for the anatomy/pruning tests (no downloads)."""

from __future__ import annotations

import inspect
import json
import textwrap

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 160

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

FAMILY_KWARGS: dict[str, dict] = {
    "qwen3_moe": dict(
        _COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=2,
    ),
    "qwen2_moe": dict(
        _COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
        num_experts_per_tok=2, qkv_bias=True, mlp_only_layers=[1],
    ),
    "olmoe": dict(
        _COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2, attention_bias=False,
    ),
    "mixtral": dict(_COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "qwen3_next": dict(
        _COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
        num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, mlp_only_layers=[2],
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    ),
}
FAMILIES = sorted(FAMILY_KWARGS)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Default init leaves routers at zero and norms at one, which hides mistakes; spread everything out."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")) or "conv1d" in name:
                continue
            if p.ndim == 1:
                base = 0.0 if name.endswith("norm.weight") and model.config.model_type == "qwen3_next" else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def tiny_model(family: str, seed: int = 0, **overrides):
    kwargs = dict(FAMILY_KWARGS[family], **overrides)
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _randomize(model, seed)
    model.eval()
    return model


def real_text() -> list[str]:
    """Paragraphs of real English/Python text from the standard library (present on every machine)."""
    sources = [inspect.getsource(json), inspect.getsource(textwrap), inspect.getsource(inspect)]
    paras = []
    for src in sources:
        paras += [p.strip() for p in src.split("\n\n") if len(p.strip()) > 80]
    return paras


def byte_ids(text: str, vocab: int = VOCAB) -> list[int]:
    return [b % vocab for b in text.encode("utf-8")]


def token_batch(n: int = 4, length: int = 32, offset: int = 0) -> torch.Tensor:
    ids = byte_ids(" ".join(real_text()))[offset:]
    return torch.tensor(ids[: n * length]).view(n, length)
