"""Every touch of transformers' MTP drafting (`generate(use_mtp=True)`), for families whose checkpoints store MTP
layers after the decoder layers (GLM-4-MoE, DeepSeek-V3).

Calibration runs those layers as the drafter does: `transformers.modeling_layers.MtpModel` built for the main model,
its layers sharing the modules hf-slim attached (`hf_slim.anatomy.attach_mtp_layers`), one depth at a time through
its `forward_layer` (the per-depth step transformers exposes for frameworks that own the drafting loop). Whether stock
transformers finds a checkpoint's MTP layers is the rule `MtpModel.get_mtp_weights_regex` applies to the model
class's `_keys_to_ignore_on_load_unexpected` (fixed layer numbers: GLM-4-MoE 46 and 92, DeepSeek-V3 61), reproduced
by [`mtp_weights_found`]. `TOUCH_POINTS` lists what is read and why.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = ["TOUCH_POINTS", "mtp_drafter", "mtp_layer_numbers", "mtp_weights_found", "run_mtp_depth"]

TOUCH_POINTS: dict[str, str] = {
    "transformers.modeling_layers.MtpModel": (
        "the MTP drafter generate(use_mtp=True) builds: its layers (enorm, hnorm, eh_proj, mtp_block, post_norm), "
        "tie_with_main_model, and forward_layer(layer_idx, last_hidden_states, position_ids, mtp_cache, input_ids=)"
    ),
    "transformers.modeling_layers.MtpModel.get_mtp_weights_regex": (
        "the rule that finds MTP weights in a checkpoint, reproduced by mtp_weights_found"
    ),
    "transformers.PreTrainedModel._keys_to_ignore_on_load_unexpected": (
        "private: the MTP layer patterns of GLM-4-MoE / DeepSeek-V3 (fixed layer numbers) that rule reads"
    ),
}


def mtp_drafter(model: Any, blocks: Sequence[torch.nn.Module]) -> Any:
    """transformers' MTP drafter for `model`, its layers made of `blocks` (modules attached by
    `hf_slim.anatomy.attach_mtp_layers`: a decoder block with `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`), so
    hooks on them see what drafting computes. Built on the meta device; it owns no weights of its own."""
    from transformers.modeling_layers import MtpModel

    with torch.device("meta"):
        drafter = MtpModel(model, len(blocks))
    for layer, block in zip(drafter.layers, blocks, strict=True):
        layer.enorm, layer.hnorm, layer.eh_proj = block.enorm, block.hnorm, block.eh_proj
        layer.mtp_block = block
        layer.post_norm = block.shared_head.norm
    drafter.tie_with_main_model(model)
    drafter.eval()
    return drafter


def run_mtp_depth(drafter: Any, k: int, input_ids: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """MTP depth `k + 1` on a calibration batch, teacher-forced: position `i` combines `previous[:, i]` (the main
    model's normed last hidden state for depth 1, else depth `k`'s output) with the embedding of token `i + k + 1`, at
    that token's position, as drafting does. Returns `[batch, T - k - 1, hidden]`."""
    depth = k + 1
    length = input_ids.shape[1] - depth
    positions = torch.arange(depth, input_ids.shape[1], device=previous.device).unsqueeze(0)
    return drafter.forward_layer(k, previous[:, :length].contiguous(), positions, None, input_ids=input_ids[:, depth:])


def mtp_layer_numbers(model_class: type) -> list[int]:
    """The layer numbers the model class's MTP patterns name (GLM-4-MoE: `[92, 46]`, DeepSeek-V3: `[61]`)."""
    out = []
    for pattern in getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or []:
        m = re.search(r"\.(\d+)", pattern)
        if m is not None:
            out.append(int(m.group(1)))
    return out


def mtp_weights_found(model_class: type, num_hidden_layers: int, names: Iterable[str]) -> bool:
    """Whether stock transformers' drafter finds every tensor in `names` (MTP tensors of a checkpoint whose config
    has `num_hidden_layers`), by the rule of `MtpModel.get_mtp_weights_regex`."""
    patterns = []
    for pattern in getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or []:
        m = re.search(r"\.(\d+)", pattern)
        if m is not None and int(m.group(1)) < num_hidden_layers:
            continue
        patterns.append(pattern)
    if not patterns:
        return False
    regex = re.compile("|".join(rf"({p})" for p in patterns))
    return all(regex.search(name) is not None for name in names)
