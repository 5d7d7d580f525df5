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

from .aurora import Aurora, _direction_options, _momentum_step, _row_scale_shape, _with_adamw_groups, aurora_direction, shape_scale
from .sharded import RemoteJob, local_tensor, polar_cost


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
            gi = len(self.param_groups) - 1
            for i, (A, B) in enumerate(zip(params[::2], params[1::2])):
                if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                    raise ValueError(
                        f"LoRA pair shapes A={tuple(A.shape)}, B={tuple(B.shape)} do not form B @ A with a shared rank"
                    )
                self._check_pair_layouts(gi, 2 * i)

    def _check_pair_layouts(self, gi: int, i: int) -> None:
        """Both factors of the pair at `param_groups[gi]['params'][i:i+2]` whole on every rank, or both sharded
        on the same 1-D mesh; otherwise a `ValueError` naming them."""
        A, B = self.param_groups[gi]["params"][i : i + 2]
        la, lb = self._layouts.get(A), self._layouts.get(B)
        whole = [la is None or la.whole_matrices_local, lb is None or lb.whole_matrices_local]
        if all(whole) or (not any(whole) and la.group is lb.group):
            return
        placements = [tuple(x.placements) if hasattr(x, "placements") else "plain tensor" for x in (A, B)]
        raise ValueError(
            f"LoRA pair {self._param_name(gi, i)!r} / {self._param_name(gi, i + 1)!r} has layouts {placements[0]} / "
            f"{placements[1]}, which Aurora-LoRA cannot combine: both factors must be whole on every rank (plain "
            "tensors or Replicate()) or both sharded on the same 1-D mesh"
        )

    def _step_group(self, group: dict[str, Any]) -> None:
        if "lora_scaling" not in group:
            super()._step_group(group)
            return
        options = dict(lora_damping=group["lora_damping"], scale=group["scale"], **_direction_options(group))
        produces_C = group["carry_row_scale"] and group["pp_iterations"] > 0
        params = group["params"]
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        remote = []
        for k, ((A, B), s) in enumerate(zip(zip(params[::2], params[1::2]), group["lora_scaling"])):
            if A.grad is None and B.grad is None:
                continue
            self._check_pair_layouts(gi, 2 * k)
            grads = [local_tensor(p.grad) if p.grad is not None else torch.zeros_like(local_tensor(p)) for p in (A, B)]
            X_A, X_B = (
                _momentum_step(g, self._momentum_buffer(p), group["momentum"], group["nesterov"])
                for g, p in zip(grads, (A, B))
            )
            C_A, C_B = self._carried_row_scale(A, group), self._carried_row_scale(B, group)
            la, lb = self._layouts.get(A), self._layouts.get(B)
            if la is None or la.whole_matrices_local:
                uA, uB, C_A, C_B = lora_pair_update(
                    local_tensor(A), local_tensor(B), X_A, X_B, lora_scaling=s, row_scale_A=C_A, row_scale_B=C_B, **options
                )
                self._apply_update(A, uA, C_A, group)
                self._apply_update(B, uB, C_B, group)
                continue
            # Sharded pair: its owner gathers both factors, their momenta and row corrections, and computes it whole.
            cA, cB = _row_scale_shape(la.shape), _row_scale_shape(lb.shape)
            inputs = [(local_tensor(A), la.dim, la.shape), (local_tensor(B), lb.dim, lb.shape), (X_A, la.dim, la.shape), (X_B, lb.dim, lb.shape)]
            inputs += [(C, 0, shape) for C, shape in ((C_A, cA), (C_B, cB)) if C is not None]
            outputs = [(la.dim, la.shape, torch.float32), (lb.dim, lb.shape, torch.float32)]
            outputs += [(0, c, p.dtype) for c, p in ((cA, A), (cB, B)) if produces_C and p.shape[0] != p.shape[1]]
            cost = polar_cost(la.shape) + polar_cost(lb.shape)
            remote.append((la, RemoteJob(-1, inputs, outputs, key=(A, B, s, C_A is not None, C_B is not None), cost=cost)))
        for exchange, bucket in self._remote_exchanges(remote):
            owned = [job for job in bucket if job.owner == exchange.rank]
            results = []
            for job, full in zip(owned, exchange.gather(bucket)):
                A, B, s, has_CA, has_CB = job.key
                rest = iter(full[4:])
                C_A = next(rest) if has_CA else None
                C_B = next(rest) if has_CB else None
                uA, uB, C_A, C_B = lora_pair_update(*full[:4], lora_scaling=s, row_scale_A=C_A, row_scale_B=C_B, **options)
                results.append([uA, uB] + ([C for C in (C_A, C_B) if C is not None] if produces_C else []))
            for job, pieces in zip(bucket, exchange.scatter(bucket, results)):
                A, B = job.key[:2]
                rest = iter(pieces[2:])
                C_A = next(rest) if produces_C and A.shape[0] != A.shape[1] else None
                C_B = next(rest) if produces_C and B.shape[0] != B.shape[1] else None
                self._apply_update(A, pieces[0], C_A, group)
                self._apply_update(B, pieces[1], C_B, group)
