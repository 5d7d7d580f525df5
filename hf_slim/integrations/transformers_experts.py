"""Every touch of transformers' MoE experts machinery, for computing an experts block's forward ourselves.

The calibration pass replaces an experts module's ``forward`` with one that computes the same output and collects
statistics on the way. To match the model's own arithmetic it uses the grouped GEMM when the experts dispatch to
transformers' default ``grouped_mm`` implementation, else a per-expert loop (the ``eager`` arithmetic).

The grouped GEMM is PyTorch's public ``torch.nn.functional.grouped_mm`` (torch >= 2.10), called exactly as
transformers' private ``transformers.integrations.moe._grouped_linear`` calls it (``input.to(weight.dtype)``,
weight transposed, ``offs`` the cumulative token counts), so no private transformers kernel is imported. Where
transformers would use its own fallback op instead (CUDA below SM 8.0), `grouped_linear_kernel` returns `None` and
calibration loops per expert, which is the same arithmetic.

The experts layout itself comes from the public decorator ``transformers.integrations.use_experts_implementation``
(``gate_up_proj [E, 2I, H]`` with gate then up, ``down_proj [E, H, I]``, ``forward(hidden_states, top_k_index,
top_k_weights)``, the flags below); ``TOUCH_POINTS`` lists what is read and why.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


__all__ = ["TOUCH_POINTS", "experts_implementation", "grouped_linear", "grouped_linear_kernel"]

TOUCH_POINTS: dict[str, str] = {
    "transformers.PreTrainedConfig._experts_implementation": (
        "private: the implementation an experts module dispatches to, read from its `config` as transformers' own "
        "dispatch does (the public PreTrainedModel.get_experts_implementation() covers only whole models)"
    ),
    "transformers.integrations.use_experts_implementation": (
        "public decorator: gives experts modules forward(hidden_states, top_k_index, top_k_weights) and the flags "
        "has_bias / is_transposed / has_gate / is_concatenated / has_post_expert_norm the replacement forward relies on"
    ),
    "transformers.integrations.grouped_mm_experts_forward": (
        "public: the `grouped_mm` forward whose arithmetic the calibration forward reproduces"
    ),
}
"""Each transformers name this module relies on, and why. tests/test_transformers_touchpoints.py checks each."""

_GROUPED = "grouped_mm"


def experts_implementation(experts: Any) -> str | None:
    """The experts implementation ``experts`` dispatches to (``"grouped_mm"``, ``"eager"``, ...), or `None`."""
    return getattr(getattr(experts, "config", None), "_experts_implementation", None)


def grouped_linear_kernel(experts: Any) -> Any:
    """`grouped_linear` when ``experts`` use the default ``grouped_mm`` implementation in the layout it handles and
    its device has the kernel, else `None` (then compute per expert with the eager arithmetic)."""
    if experts_implementation(experts) != _GROUPED:
        return None
    if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
        return None
    if not hasattr(F, "grouped_mm"):
        return None
    weight = getattr(experts, "gate_up_proj", None)
    on_cuda = isinstance(weight, torch.Tensor) and weight.device.type == "cuda"
    # as transformers' `_can_use_grouped_mm`: CUDA needs SM 8.0+; below it transformers runs its own fallback op
    if on_cuda and torch.cuda.get_device_capability(weight.device) < (8, 0):
        return None
    return grouped_linear


def grouped_linear(input: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-expert ``input[rows_e] @ weight[e].T`` for tokens sorted by expert, in one grouped GEMM.

    Args:
        input (`torch.Tensor`): ``[S, in]``, rows grouped by expert.
        weight (`torch.Tensor`): ``[E, out, in]``.
        offsets (`torch.Tensor`): ``int32 [E]``, the end row of each expert's group (cumulative counts).

    Returns:
        `torch.Tensor`: ``[S, out]`` in ``weight``'s dtype.
    """
    return F.grouped_mm(input.to(weight.dtype), weight.transpose(-2, -1), offs=offsets)
