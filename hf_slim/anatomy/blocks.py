"""Questions about a model instance that its axes spec answers: which blocks hold a module, and how wide each block's
experts are."""

from __future__ import annotations

from typing import Any

import torch

from .core import ArchSpec

__all__ = ["layers_with", "expert_ffn_activations"]


def layers_with(model: Any, spec: ArchSpec, key: str) -> list[tuple[int, int | str]]:
    """Blocks holding the module `spec.modules[key]` (e.g. `experts`, `attn_out`, `dense_down`), as
    `(statistics index, selection key)`: decoder layers by number, other blocks (MTP layers) by prefix."""
    path = spec.modules[key]
    out: list[tuple[int, int | str]] = []
    for i, block in enumerate(spec.blocks(model)):
        try:
            model.get_submodule(f"{block}.{path}")
        except AttributeError:
            continue
        out.append((i, int(block.rsplit(".", 1)[1]) if spec.is_decoder_block(block) else block))
    return out


def expert_ffn_activations(model: Any, spec: ArchSpec, stats: Any) -> list[tuple[int | str, torch.Tensor]]:
    """`(selection key, [E, I_layer])` per block with routed experts, from the `expert_ffn.act` statistic.

    The statistic is stored at the widest expert width; blocks with narrower experts (a per-layer
    `moe_intermediate_size`) use only their own first `I_layer` columns.
    """
    act = stats["expert_ffn.act"]
    blocks = spec.blocks(model)
    out = []
    for i, key in layers_with(model, spec, "experts"):
        width = model.get_submodule(f"{blocks[i]}.{spec.modules['experts']}").gate_up_proj.shape[1] // 2
        out.append((key, act[i, :, :width]))
    return out
