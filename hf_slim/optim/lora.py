"""Aurora for PEFT LoRA adapters: the (A, B) pair updated jointly in whitened coordinates.

A LoRA layer adds ``ΔW = s · B A`` (``A: [r, in]``, ``B: [out, r]``, ``s = lora_alpha / r``). Orthogonalizing
the gradients of A and B separately ("Muon on factors") depends on how the product is split between the
factors: A's extreme aspect ratio and B's zero initialization make the two updates badly scaled, which
is one reason Muon underperforms with LoRA. Following LoRA-Muon (arXiv 2606.12921) we work in the
tangent space of the rank-r matrices at ``B A``: a tangent step is ``δB A + B δA``, and with the factor Gram
matrices ``P_A = A Aᵀ``, ``P_B = Bᵀ B`` it is ``X Q_A + Q_B Y`` where ``Q_A = P_A^{-1/2} A`` and
``Q_B = B P_B^{-1/2}`` have orthonormal rows / columns, ``X = δB P_A^{1/2}`` and ``Y = P_B^{1/2} δA``.

In these whitened coordinates the gradients are ``G_X = G_B P_A^{-1/2}`` and ``G_Y = P_B^{-1/2} G_A`` (the
factor ``s`` cancels in the direction), and the step in ``W`` has the row norms of ``X`` and the column
norms of ``Y`` exactly. So Aurora's row balancing applied to ``X`` (``[out, r]``, tall: output neurons) and
to ``Y`` (``[r, in]``, wide: transposed to tall, input features) balances the neurons of the *effective*
weight update, independent of how the product is split between A and B. The factor steps are mapped
back with ``δB = -lr · c/s · O_X P_A^{-1/2}``, ``δA = -lr · c/s · P_B^{-1/2} O_Y`` with ``c`` the shape scale
of the full ``[out, in]`` matrix. Gram matrices are damped by ``lora_damping · trace / r``.

Parameters that are not LoRA pairs (``modules_to_save``, biases, DoRA magnitudes, embedding LoRA) go to
the internal AdamW group.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .aurora import Aurora, _direction_options, _momentum_step, _with_adamw_groups, aurora_direction, shape_scale


__all__ = ["AuroraLoRA", "aurora_lora_param_groups", "lora_pair_update"]


def _inv_sqrt_psd(P: torch.Tensor, damping: float) -> torch.Tensor:
    r = P.shape[-1]
    lam = damping * torch.diagonal(P, dim1=-2, dim2=-1).sum(-1).clamp(min=0) / r + 1e-30
    evals, evecs = torch.linalg.eigh(P.double() + lam.double()[..., None, None] * torch.eye(r, dtype=torch.float64, device=P.device))
    inv = evals.clamp(min=1e-300).rsqrt()
    return ((evecs * inv.unsqueeze(-2)) @ evecs.mT).to(P.dtype)


@torch.no_grad()
def lora_pair_update(
    A: torch.Tensor,
    B: torch.Tensor,
    X_A: torch.Tensor,
    X_B: torch.Tensor,
    *,
    lora_scaling: float,
    lora_damping: float = 1e-4,
    row_scale_A: torch.Tensor | None = None,
    row_scale_B: torch.Tensor | None = None,
    scale: str = "spectral",
    **direction_options: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Whitened Aurora directions for one LoRA pair (to be multiplied by ``-lr``).

    Args:
        A (`torch.Tensor` of shape `[r, in]`), B (`torch.Tensor` of shape `[out, r]`): Current factors.
        X_A, X_B (`torch.Tensor`): Momentum-combined gradients of A and B (same shapes).
        lora_scaling (`float`): PEFT's ``scaling[adapter]`` (``lora_alpha / r``).
        lora_damping (`float`, *optional*, defaults to 1e-4): Relative damping of the Gram matrices.
        row_scale_A, row_scale_B (`torch.Tensor`, *optional*): Carried Aurora row corrections.
        scale (`str`, *optional*, defaults to `"spectral"`): Shape scale of the full `[out, in]` matrix, see
            `shape_scale`.
        **direction_options: `aurora_direction`'s Newton–Schulz and row-balancing settings (`ns_schedule`,
            `ns_steps`, `pp_iterations`, `pp_beta`, `ns_dtype`, `eps`), with its defaults.

    Returns:
        `tuple`: update of A, update of B (float32) and the two new row corrections.
    """
    A32, B32 = A.float(), B.float()
    iA = _inv_sqrt_psd(A32 @ A32.mT, lora_damping)
    iB = _inv_sqrt_psd(B32.mT @ B32, lora_damping)
    G_X = X_B.float() @ iA
    G_Y = iB @ X_A.float()
    O_X, C_B = aurora_direction(G_X, row_scale=row_scale_B, **direction_options)
    O_Y, C_A = aurora_direction(G_Y, row_scale=row_scale_A, **direction_options)
    c = shape_scale(B.shape[-2], A.shape[-1], scale) / lora_scaling
    return c * (iB @ O_Y), c * (O_X @ iA), C_A, C_B


def aurora_lora_param_groups(
    model: nn.Module,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    adamw_lr: float | None = None,
    adamw_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Groups for `AuroraLoRA`: one group of LoRA (A, B) pairs, AdamW groups for other trainable parameters.

    A pair is taken from every module with ``lora_A`` / ``lora_B`` `nn.ModuleDict`s of `nn.Linear` (PEFT's
    `LoraLayer`) for each adapter whose weights are trainable.

    Args:
        model (`nn.Module`): A PEFT model (or any module holding PEFT LoRA layers).
        lr, weight_decay, adamw_lr, adamw_weight_decay (`float`, *optional*): Set on the groups when given.

    Returns:
        `list[dict]`: the pair group (`params` = `[A1, B1, A2, B2, ...]` as `(name, tensor)` pairs,
        `lora_scaling` = one float per pair) followed by AdamW groups.
    """
    pairs: list[tuple[str, nn.Parameter]] = []
    scalings: list[float] = []
    paired: set[int] = set()
    for mod_name, module in model.named_modules():
        lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_A, nn.ModuleDict) or not isinstance(lora_B, nn.ModuleDict):
            continue
        for adapter in lora_A.keys():
            if adapter not in lora_B or not isinstance(lora_A[adapter], nn.Linear):
                continue
            A, B = lora_A[adapter].weight, lora_B[adapter].weight
            if not (A.requires_grad and B.requires_grad) or A.ndim != 2 or B.ndim != 2:
                continue
            pairs += [(f"{mod_name}.lora_A.{adapter}.weight", A), (f"{mod_name}.lora_B.{adapter}.weight", B)]
            scalings.append(float(module.scaling[adapter]))
            paired.update((id(A), id(B)))
    if not pairs:
        raise ValueError(
            "model has no trainable PEFT LoRA (lora_A, lora_B) pairs; optim='aurora_lora' needs a LoRA model "
            "(peft.get_peft_model with a LoraConfig). Use optim='aurora' for full fine-tuning."
        )
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in paired:
            (decay if p.ndim >= 2 else plain).append((name, p))
    main = {"params": pairs, "use_aurora": True, "lora_scaling": scalings}
    return _with_adamw_groups(main, decay, plain, lr, weight_decay, adamw_lr, adamw_weight_decay)


class AuroraLoRA(Aurora):
    """`Aurora` whose LoRA pair groups (built by `aurora_lora_param_groups`) get the whitened joint update.

    Groups with a ``lora_scaling`` list hold parameters as consecutive ``(A, B)`` pairs; all other groups
    behave exactly as in `Aurora`.

    Args:
        params (iterable): Usually `aurora_lora_param_groups(peft_model)`.
        lora_damping (`float`, *optional*, defaults to 1e-4): Relative damping of the factor Gram matrices.
        kwargs: Any `Aurora` argument.
    """

    def __init__(self, params: Iterable[Any], lora_damping: float = 1e-4, **kwargs: Any) -> None:
        if not isinstance(lora_damping, (int, float)) or lora_damping <= 0:
            raise ValueError(f"lora_damping={lora_damping!r} must be a positive number")
        self._lora_damping = float(lora_damping)
        super().__init__(params, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; a LoRA pair group must hold an even number of 2D tensors and one scaling per pair."""
        if "lora_scaling" in param_group:
            param_group.setdefault("lora_damping", self._lora_damping)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "lora_scaling" in group:
            params = group["params"]
            if len(params) % 2 or len(group["lora_scaling"]) != len(params) // 2:
                raise ValueError(
                    f"a LoRA pair group needs params [A1, B1, A2, B2, ...] and one lora_scaling per pair; got "
                    f"{len(params)} params and {len(group['lora_scaling'])} scalings"
                )
            for A, B in zip(params[::2], params[1::2]):
                if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                    raise ValueError(
                        f"LoRA pair shapes A={tuple(A.shape)}, B={tuple(B.shape)} do not form B @ A with a shared rank"
                    )

    def _step_group(self, group: dict[str, Any]) -> None:
        if "lora_scaling" not in group:
            super()._step_group(group)
            return
        params = group["params"]
        for (A, B), s in zip(zip(params[::2], params[1::2]), group["lora_scaling"]):
            if A.grad is None and B.grad is None:
                continue
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in (A, B)]
            X_A, X_B = (
                _momentum_step(g, self._momentum_buffer(p), group["momentum"], group["nesterov"])
                for g, p in zip(grads, (A, B))
            )
            uA, uB, C_A, C_B = lora_pair_update(
                A, B, X_A, X_B, lora_scaling=s, lora_damping=group["lora_damping"],
                row_scale_A=self._carried_row_scale(A, group), row_scale_B=self._carried_row_scale(B, group),
                scale=group["scale"], **_direction_options(group),
            )  # fmt: skip
            self._apply_update(A, uA, C_A, group)
            self._apply_update(B, uB, C_B, group)
