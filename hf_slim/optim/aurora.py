"""Aurora: leverage-aware orthogonalized updates (Tilde Research), with an internal AdamW group.

The update rule (for each hidden matrix ``W`` of shape ``[..., m, n]``, leading dims batched):

1. Nesterov momentum: ``M <- lerp(M, G, 1 - mu)``, ``X = lerp(G, M, mu)`` (or ``X = M``).
2. Square matrices: ``O = polar(X)``, exactly Muon.
3. Non-square: work on the tall orientation ``T`` (wide matrices are transposed), ``t = n_small / n_large``.
   Pre-scale each row by ``D = C / ||T_i||`` and take ``O = polar(D T)``; after each polar call multiply
   ``C`` by ``(t / ||O_i||²) ** pp_beta`` so rows with small leverage get more weight in the next call.
   ``pp_iterations`` polar calls per step. With ``carry_row_scale=True`` the correction ``C`` is kept in
   the optimizer state and the next step starts from it, so one polar call per step keeps the rows
   balanced once the first few steps have converged ``C`` (momentum moves slowly). With
   ``carry_row_scale=False`` and ``pp_iterations=2`` this is the reference release's rule.
4. Shape scale: ``sqrt(max(1, m / n))`` (Muon convention, ``scale="spectral"``) or Moonlight's
   AdamW-matched ``0.2 * sqrt(max(m, n))`` (``scale="match_rms_adamw"``).
5. Decoupled weight decay, then ``W <- W - lr * O``.

Non-matrix parameters (embeddings, output head, norms, biases, routers by default) are updated by an
AdamW group inside the same optimizer; `aurora_param_groups` makes the split.

Same-shape matrices of a group (e.g. every layer's ``k_proj``) are stacked into one batched Newton–Schulz
computation. DTensor parameters (FSDP2's ``fully_shard``) are handled on purpose: a matrix split across ranks
is computed whole by one owner rank and its update shards sent back (`hf_slim.optim.sharded`), giving the
unsharded optimizer's update.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .polar import NS_SCHEDULES, input_scale, newton_schulz, ns_coefficients, polar_factor, resolve_ns_dtype
from .param_groups import _with_adamw_groups, aurora_param_groups  # noqa: F401 (re-exported; lora.py imports it here)
from .sharded import (
    OwnerExchange,
    RemoteJob,
    ShardLayout,
    assign_owners,
    dtensor_layout,
    dtensor_like,
    is_dtensor,
    local_tensor,
    polar_cost,
)


__all__ = [
    "AURORA_PRESETS",
    "Aurora",
    "NonFiniteGradientError",
    "aurora_direction",
    "aurora_param_groups",
    "aurora_update",
    "shape_scale",
]

SCALES = ("spectral", "match_rms_adamw", "none")
NONFINITE_POLICIES = ("error", "skip")

AURORA_PRESETS: dict[str, dict[str, Any]] = {
    # The engineered default: Polar Express (6 steps) and one polar call per step with the row
    # correction carried across steps. About 1.2x a Muon step of the same precision (docs/aurora.md).
    "default": {
        "ns_schedule": "polar_express",
        "ns_steps": 6,
        "pp_iterations": 1,
        "pp_beta": 0.5,
        "carry_row_scale": True,
    },
    # The cost of a 5-step Muon: Polar Express with 5 steps. Row balance as the default (docs/aurora.md,
    # row-balance table), but the polar factor itself is looser (about 9% relative error vs 0.1%; still
    # tighter than Keller Jordan's Muon schedule).
    "fast": {
        "ns_schedule": "polar_express",
        "ns_steps": 5,
        "pp_iterations": 1,
        "pp_beta": 0.5,
        "carry_row_scale": True,
    },
    # The configuration of tilde-research/aurora-release: 12-step simple quintic in bf16,
    # two polar calls per step, no state carried, lr 0.05, weight decay 0.025.
    "reference": {
        "ns_schedule": "tilde_quintic12",
        "ns_steps": 12,
        "pp_iterations": 2,
        "pp_beta": 0.5,
        "carry_row_scale": False,
        "ns_dtype": "bfloat16",
        "lr": 0.05,
        "weight_decay": 0.025,
        "momentum": 0.95,
        "nesterov": True,
    },
    # Plain Muon (Keller Jordan's 5-step schedule, no row balancing), for comparisons.
    "muon": {
        "ns_schedule": "jordan5",
        "ns_steps": 5,
        "pp_iterations": 0,
        "carry_row_scale": False,
    },
}
"""Named configurations for `Aurora.from_preset` and ``optim_args="preset=..."``."""


class NonFiniteGradientError(FloatingPointError):
    """Raised by `Aurora.step` when a gradient holds NaN or Inf and ``nonfinite="error"``."""


def shape_scale(m: int, n: int, scale: str = "spectral") -> float:
    """Multiplier applied to an orthogonalized update of a matrix with ``m`` rows and ``n`` columns.

    Args:
        m (`int`): Rows (output features).
        n (`int`): Columns (input features).
        scale (`str`, *optional*, defaults to `"spectral"`): `"spectral"` gives `sqrt(max(1, m/n))` (Muon,
            Aurora reference); `"match_rms_adamw"` gives `0.2 * sqrt(max(m, n))` (Moonlight: the update RMS
            matches AdamW's, so AdamW learning rates carry over); `"none"` gives 1.
    """
    if scale == "spectral":
        return max(1.0, m / n) ** 0.5
    if scale == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if scale == "none":
        return 1.0
    raise ValueError(f"scale={scale!r} is not supported; valid: {list(SCALES)}")


@torch.no_grad()
def aurora_direction(
    X: torch.Tensor,
    *,
    ns_schedule: str = "polar_express",
    ns_steps: int | None = None,
    pp_iterations: int = 1,
    pp_beta: float = 0.5,
    row_scale: torch.Tensor | None = None,
    ns_dtype: str | torch.dtype = "float32",
    eps: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Leverage-balanced polar factor of ``X`` (no momentum, no shape scale).

    Args:
        X (`torch.Tensor` of shape `[..., m, n]`): Update direction; leading dims are independent matrices.
        ns_schedule (`str`, *optional*, defaults to `"polar_express"`): Newton–Schulz schedule.
        ns_steps (`int`, *optional*): Newton–Schulz steps (schedule default when omitted).
        pp_iterations (`int`, *optional*, defaults to 1): Polar calls with row re-weighting; 0 gives the
            plain polar factor (Muon) for every shape.
        pp_beta (`float`, *optional*, defaults to 0.5): Exponent of the row re-weighting.
        row_scale (`torch.Tensor` of shape `[..., max(m, n), 1]`, *optional*): Row correction ``C`` carried
            from the previous step; ones when omitted.
        ns_dtype (`str` or `torch.dtype`, *optional*, defaults to `"float32"`): Newton–Schulz precision.
        eps (`float`, *optional*, defaults to 1e-7): Floor for row norms.

    Returns:
        `tuple[torch.Tensor, torch.Tensor | None]`: the direction (shape of `X`, float32) and the row
        correction to carry into the next step (float32, tall orientation), or `None` for square
        matrices and ``pp_iterations=0``.
    """
    O, C = _balanced_polar(
        X, ns_schedule=ns_schedule, ns_steps=ns_steps, pp_iterations=pp_iterations, pp_beta=pp_beta,
        row_scale=row_scale, ns_dtype=ns_dtype, eps=eps,
    )  # fmt: skip
    return O.float(), C


def _balanced_polar(
    X: torch.Tensor,
    *,
    ns_schedule: str,
    ns_steps: int | None,
    pp_iterations: int,
    pp_beta: float,
    row_scale: torch.Tensor | None,
    ns_dtype: str | torch.dtype,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`aurora_direction` with the direction left in the Newton–Schulz dtype (no float32 copy)."""
    m, n = X.shape[-2], X.shape[-1]
    if m == n or pp_iterations == 0:
        return polar_factor(X, ns_schedule, ns_steps, ns_dtype, eps), None
    work = resolve_ns_dtype(ns_dtype, X.device)
    coeffs = ns_coefficients(ns_schedule, ns_steps)
    lead, tall, small = X.shape[:-2], max(m, n), min(m, n)
    # Everything stays in X's layout: a neuron (a row of the tall orientation) is a row of a tall X and a
    # column of a wide one, so its norms reduce over dim `red` and the row vectors broadcast along it.
    red = -1 if m > n else -2
    W = X.reshape(-1, m, n).float()
    row_sq = (W * W).sum(dim=red, keepdim=True)  # [B, m, 1] or [B, 1, n]
    if bool(row_sq.isinf().any()):
        # a finite input whose squares overflow float32 (entries above ~1e19): the direction does not depend on
        # the input's scale, so divide by the largest entry first instead of returning NaN
        W = W / W.abs().amax(dim=(-2, -1), keepdim=True)
        row_sq = (W * W).sum(dim=red, keepdim=True)
    row_norm = row_sq.sqrt()
    D = 1.0 / row_norm.clamp(min=eps)
    if row_scale is None:
        C = torch.ones_like(row_norm)
    else:
        C = row_scale.float().reshape(-1, tall, 1)
        C = C if m > n else C.mT
    target = small / tall
    scale_in = input_scale(ns_schedule)
    for _ in range(pp_iterations):
        f = D * C
        # ||diag(f) T||_F from the row norms, so normalizing costs no pass over the matrix; then one pass
        # scales the rows and casts to the iteration dtype.
        fro = (f * f * row_sq).sum(dim=(-2, -1), keepdim=True).sqrt()
        factor = f / (fro * scale_in + eps)
        if is_dtensor(W):  # called on DTensors directly (not through Aurora.step): no out= across layouts
            Y = (W * factor).to(work)
        else:
            Y = torch.mul(W, factor, out=torch.empty(W.shape, dtype=work, device=W.device))
        Y = newton_schulz(Y, coeffs)
        Yf = Y.float()
        o_sq = (Yf * Yf).sum(dim=red, keepdim=True).clamp(min=eps * eps)
        C = C * (target / o_sq).pow(pp_beta)
    # C leaves this call only as carried state: rescale it to mean one (the polar factor ignores a
    # global scale) and bound it, so a row whose gradient is exactly zero cannot grow it without end.
    C = torch.where(row_norm > eps, C, torch.ones_like(C))
    C = (C / C.mean(dim=-2 if m > n else -1, keepdim=True)).clamp(min=1e-4, max=1e4)
    C = C if m > n else C.mT
    return Y.reshape(*lead, m, n), C.reshape(*lead, tall, 1)


_DIRECTION_OPTIONS = ("ns_schedule", "ns_steps", "pp_iterations", "pp_beta", "ns_dtype", "eps")


def _direction_options(group: Mapping[str, Any]) -> dict[str, Any]:
    """The `aurora_direction` keyword arguments (Newton–Schulz and row-balancing settings) of a parameter group."""
    return {key: group[key] for key in _DIRECTION_OPTIONS}


def _momentum_step(grad: torch.Tensor, buffer: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """Update `buffer` in place and return the direction to orthogonalize (Nesterov: `lerp(grad, buffer, momentum)`)."""
    buffer.lerp_(grad, 1 - momentum)
    return torch.lerp(grad, buffer, momentum) if nesterov else buffer


@torch.no_grad()
def aurora_update(
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    row_scale: torch.Tensor | None = None,
    ns_schedule: str = "polar_express",
    ns_steps: int | None = None,
    pp_iterations: int = 1,
    pp_beta: float = 0.5,
    scale: str = "spectral",
    ns_dtype: str | torch.dtype = "float32",
    eps: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One Aurora update for a matrix (or a batch ``[..., m, n]``): momentum, balanced polar, shape scale.

    ``momentum_buffer`` is updated in place; ``grad`` is left untouched.

    Returns:
        `tuple[torch.Tensor, torch.Tensor | None]`: the update to subtract (times the learning rate), in
        float32, and the new row correction (see `aurora_direction`).
    """
    X = _momentum_step(grad, momentum_buffer, momentum, nesterov)
    direction, new_row_scale = aurora_direction(
        X, ns_schedule=ns_schedule, ns_steps=ns_steps, pp_iterations=pp_iterations, pp_beta=pp_beta,
        row_scale=row_scale, ns_dtype=ns_dtype, eps=eps,
    )  # fmt: skip
    direction = direction * shape_scale(grad.shape[-2], grad.shape[-1], scale)
    return direction, new_row_scale


# Fused batches hold at most this many elements (64 MiB of fp32 per copy), so stacking many same-shape
# matrices does not multiply the Newton–Schulz temporaries beyond what the largest single parameter needs.
_FUSE_MAX_ELEMENTS = 1 << 24


@torch.no_grad()
def _fused_directions(
    works: list[tuple[torch.Tensor, torch.Tensor | None]], options: Mapping[str, Any]
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """`_balanced_polar` of many `(X, C)` items, same-shape matrices fused into one batched computation.

    Items are `(X [..., m, n], C [..., max(m, n), 1] or None)`; returns `(direction in the Newton–Schulz dtype,
    new C or None)` per item, equal (up to batched-kernel rounding) to calling `_balanced_polar` on each.
    """
    results: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(works)
    buckets: dict[tuple[int, int, torch.dtype, torch.device], list[int]] = {}
    for i, (X, _) in enumerate(works):
        buckets.setdefault((X.shape[-2], X.shape[-1], X.dtype, X.device), []).append(i)
    for (m, n, _, _), idx in buckets.items():
        chunk: list[int] = []
        size = 0
        for i in idx:
            numel = works[i][0].numel()
            if chunk and size + numel > _FUSE_MAX_ELEMENTS:
                _direction_chunk(works, chunk, m, n, options, results)
                chunk, size = [], 0
            chunk.append(i)
            size += numel
        _direction_chunk(works, chunk, m, n, options, results)
    return results  # type: ignore[return-value]


def _direction_chunk(works, chunk, m, n, options, results) -> None:
    Xs = [works[i][0] for i in chunk]
    counts = [X.numel() // (m * n) for X in Xs]
    Xb = Xs[0].reshape(-1, m, n) if len(Xs) == 1 else torch.cat([X.reshape(-1, m, n) for X in Xs])
    Cb = None
    tall = max(m, n)
    if m != n and any(works[i][1] is not None for i in chunk):
        Cs = [
            works[i][1].float().reshape(-1, tall, 1) if works[i][1] is not None else Xb.new_ones(c, tall, 1, dtype=torch.float32)
            for i, c in zip(chunk, counts)
        ]
        Cb = Cs[0] if len(Cs) == 1 else torch.cat(Cs)
    O, C_new = _balanced_polar(Xb, row_scale=Cb, **options)
    Os = torch.split(O, counts)
    C_news = torch.split(C_new, counts) if C_new is not None else [None] * len(chunk)
    for i, X, O_i, C_i in zip(chunk, Xs, Os, C_news):
        results[i] = (O_i.reshape(X.shape), None if C_i is None else C_i.reshape(*X.shape[:-2], tall, 1))


def _row_scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the carried row correction of a `[..., m, n]` parameter: `[..., max(m, n), 1]`."""
    return (*shape[:-2], max(shape[-2], shape[-1]), 1)


def _row_scale_dim(layout: ShardLayout) -> int | None:
    """How a DTensor parameter's row correction is sharded: like the parameter when whole matrices are local
    (replicated, or split on a leading dim), else along its first dim (its owner gathers it with the matrix)."""
    if layout.whole_matrices_local:
        return layout.dim
    return 0


# --------------------------------------------------------------------------------------------------
# Parameter routing
# --------------------------------------------------------------------------------------------------

# A router/gate projection: `mlp.gate`, `router`, `shared_expert_gate` (not `gate_proj`/`gate_up_proj`).


def _validate_group(group: Mapping[str, Any]) -> None:
    lr = group["lr"]
    if not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"lr={lr!r} must be a non-negative number")
    wd = group["weight_decay"]
    if not isinstance(wd, (int, float)) or wd < 0:
        raise ValueError(f"weight_decay={wd!r} must be a non-negative number")
    mom = group["momentum"]
    if not isinstance(mom, (int, float)) or not 0.0 <= mom < 1.0:
        raise ValueError(f"momentum={mom!r} must be in [0, 1)")
    if not isinstance(group["nesterov"], bool):  # bool("no") is True: a string would silently mean Nesterov
        raise TypeError(f"nesterov={group['nesterov']!r} must be True or False")
    if group["ns_schedule"] not in NS_SCHEDULES:
        raise ValueError(f"ns_schedule={group['ns_schedule']!r} is not a known schedule; valid: {sorted(NS_SCHEDULES)}")
    ns_coefficients(group["ns_schedule"], group["ns_steps"])
    k = group["pp_iterations"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"pp_iterations={k!r} must be a non-negative integer (0 = plain Muon)")
    beta = group["pp_beta"]
    if not isinstance(beta, (int, float)) or not 0.0 < beta <= 1.0:
        raise ValueError(f"pp_beta={beta!r} must be in (0, 1]")
    if group["scale"] not in SCALES:
        raise ValueError(f"scale={group['scale']!r} is not supported; valid: {list(SCALES)}")
    resolve_ns_dtype(group["ns_dtype"], torch.device("cpu"))
    b1, b2 = group["betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"adamw_betas={group['betas']!r} must both be in [0, 1)")
    if not group["eps"] > 0 or not group["adamw_eps"] > 0:
        raise ValueError(f"eps={group['eps']!r} and adamw_eps={group['adamw_eps']!r} must be positive")
    if group["use_aurora"] not in (True, False):
        raise ValueError(f"use_aurora={group['use_aurora']!r} must be True or False")


class Aurora(torch.optim.Optimizer):
    """Aurora for hidden matrices plus AdamW for everything else, in one `torch.optim.Optimizer`.

    Args:
        params (iterable): Parameters, `(name, parameter)` pairs, or groups (dicts). Groups may set
            `use_aurora`; a flat list is split by dimension (2D and up to Aurora, the rest to AdamW), which
            cannot tell embeddings from hidden matrices: prefer `aurora_param_groups(model)`.
        lr (`float`, *optional*, defaults to 0.02): Aurora learning rate (spectral units with `scale="spectral"`).
        momentum (`float`, *optional*, defaults to 0.95): Momentum coefficient, in [0, 1).
        nesterov (`bool`, *optional*, defaults to `True`): Nesterov momentum.
        weight_decay (`float`, *optional*, defaults to 0.0): Decoupled weight decay of Aurora groups.
        ns_schedule (`str`, *optional*, defaults to `"polar_express"`): `"polar_express"`, `"jordan5"` or
            `"tilde_quintic12"`.
        ns_steps (`int`, *optional*): Newton–Schulz steps; the schedule's default (6 / 5 / 12) when omitted.
        pp_iterations (`int`, *optional*, defaults to 1): Polar calls per step with row re-weighting
            (0 = plain Muon). The reference uses 2 without carried state.
        pp_beta (`float`, *optional*, defaults to 0.5): Exponent of the row re-weighting, in (0, 1].
        carry_row_scale (`bool`, *optional*, defaults to `True`): Keep the row correction across steps.
        scale (`str`, *optional*, defaults to `"spectral"`): Shape scale, see `shape_scale`.
        ns_dtype (`str`, *optional*, defaults to `"auto"`): Newton–Schulz precision: bf16 on CUDA and on CPUs with
            native bf16 (AVX512-BF16 / AMX), fp32 elsewhere (see `resolve_ns_dtype`; bf16 costs accuracy of the
            polar factor, not row balance, docs/aurora.md "Precision").
        eps (`float`, *optional*, defaults to 1e-7): Norm floor.
        adamw_lr (`float`, *optional*, defaults to 3e-4): Learning rate of AdamW groups that set none.
        adamw_betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.95)`): AdamW betas.
        adamw_eps (`float`, *optional*, defaults to 1e-8): AdamW epsilon.
        adamw_weight_decay (`float`, *optional*, defaults to 0.0): Weight decay of AdamW groups that set none.
        nonfinite (`str`, *optional*, defaults to `"error"`): On a NaN/Inf gradient, `"error"` raises
            `NonFiniteGradientError` naming the parameter before anything is written; `"skip"` leaves
            weights and state untouched for that step and counts it in `skipped_steps`.

    DTensor parameters (e.g. after `torch.distributed.fsdp.fully_shard`) on a 1-D mesh with `Shard(d)` or
    `Replicate()` get the unsharded update; each matrix split across ranks is orthogonalized whole by one owner rank
    (two all-to-alls per group and step; totals in `comm_stats`). Other layouts raise a `ValueError` naming the
    parameter.

    Example:

    ```python
    >>> from hf_slim.optim import Aurora, aurora_param_groups
    >>> opt = Aurora(aurora_param_groups(model), lr=0.02, adamw_lr=3e-4)
    >>> ref = Aurora.from_preset(aurora_param_groups(model), "reference")
    ```
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_schedule: str = "polar_express",
        ns_steps: int | None = None,
        pp_iterations: int = 1,
        pp_beta: float = 0.5,
        carry_row_scale: bool = True,
        scale: str = "spectral",
        ns_dtype: str = "auto",
        eps: float = 1e-7,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        nonfinite: str = "error",
    ) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r} is not supported; valid: {list(NONFINITE_POLICIES)}")
        if not isinstance(adamw_lr, (int, float)) or adamw_lr < 0:
            raise ValueError(f"adamw_lr={adamw_lr!r} must be a non-negative number")
        if not isinstance(adamw_weight_decay, (int, float)) or adamw_weight_decay < 0:
            raise ValueError(f"adamw_weight_decay={adamw_weight_decay!r} must be a non-negative number")
        self._adamw_lr = float(adamw_lr)
        self._adamw_weight_decay = float(adamw_weight_decay)
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        # DTensor parameters: where each Aurora matrix lives, and the process group on which ranks agree about
        # non-finite gradients (see sharded.py).
        self._layouts: dict[torch.Tensor, ShardLayout] = {}
        self._agreement_groups: dict[torch.Tensor, Any] = {}
        self.comm_stats: dict[str, int] = {"bytes_sent": 0, "bytes_received": 0, "collectives": 0}
        """Running totals of what the sharded (DTensor) path sent and received through `torch.distributed`."""
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "ns_schedule": ns_schedule,
            "ns_steps": ns_steps,
            "pp_iterations": pp_iterations,
            "pp_beta": pp_beta,
            "carry_row_scale": bool(carry_row_scale),
            "scale": scale,
            "ns_dtype": ns_dtype if isinstance(ns_dtype, str) else str(ns_dtype).replace("torch.", ""),
            "eps": eps,
            "betas": tuple(adamw_betas),
            "adamw_eps": adamw_eps,
            "use_aurora": True,
        }
        _validate_group({**defaults})
        super().__init__(self._split_flat(params), defaults)

    @staticmethod
    def _split_flat(params: Iterable[Any]) -> list[dict[str, Any]]:
        items = list(params)
        if not items:
            raise ValueError("params is empty: Aurora needs at least one parameter")
        if all(isinstance(x, Mapping) for x in items):
            return [dict(x) for x in items]
        if any(isinstance(x, Mapping) for x in items):
            raise TypeError("params must be all parameter groups (dicts) or all tensors / (name, tensor) pairs")

        def tensor_of(x: Any) -> torch.Tensor:
            return x[1] if isinstance(x, tuple) else x

        mats = [x for x in items if tensor_of(x).ndim >= 2]
        rest = [x for x in items if tensor_of(x).ndim < 2]
        groups = []
        if mats:
            groups.append({"params": mats, "use_aurora": True})
        if rest:
            groups.append({"params": rest, "use_aurora": False, "weight_decay": 0.0})
        return groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; AdamW groups (`use_aurora=False`) default to `adamw_lr` / `adamw_weight_decay`."""
        if param_group.get("use_aurora", True) is False:
            param_group.setdefault("lr", self._adamw_lr)
            param_group.setdefault("weight_decay", self._adamw_weight_decay)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group)
        gi = len(self.param_groups) - 1
        for i, p in enumerate(group["params"]):
            if group["use_aurora"] and p.ndim < 2:
                raise ValueError(
                    f"an Aurora group (use_aurora=True) holds parameter {self._param_name(gi, i)!r} of shape "
                    f"{tuple(p.shape)}; Aurora needs matrices [..., m, n]: put 1D parameters in a use_aurora=False group"
                )
        self._register_dtensors(gi)

    def _register_dtensors(self, gi: int) -> None:
        """Check and record the layout of group `gi`'s DTensor parameters not seen before.

        Also run at each distributed step, because wrappers such as accelerate's FSDP2 preparation swap the
        optimizer's parameters for their sharded DTensors after the optimizer was built.
        """
        group = self.param_groups[gi]
        for i, p in enumerate(group["params"]):
            if p in self._agreement_groups or p in self._layouts or not is_dtensor(p):
                continue
            if group["use_aurora"]:
                self._layouts[p] = dtensor_layout(p, self._param_name(gi, i))
            self._agreement_groups[p] = p.device_mesh.get_group() if p.device_mesh.ndim == 1 else None

    @classmethod
    def from_preset(cls, params: Iterable[Any], preset: str = "default", **overrides: Any) -> "Aurora":
        """Build an optimizer from a named configuration in `AURORA_PRESETS`, with keyword overrides.

        Args:
            params (iterable): As for `Aurora`.
            preset (`str`, *optional*, defaults to `"default"`): `"default"`, `"fast"`, `"reference"` or `"muon"`.
            overrides: Any `Aurora` keyword argument; wins over the preset.
        """
        if preset not in AURORA_PRESETS:
            raise ValueError(f"preset={preset!r} is not known; valid: {sorted(AURORA_PRESETS)}")
        return cls(params, **{**AURORA_PRESETS[preset], **overrides})

    def _param_name(self, gi: int, pi: int) -> str:
        group = self.param_groups[gi]
        names = group.get("param_names")
        p = group["params"][pi]
        return names[pi] if names else f"param_groups[{gi}]['params'][{pi}] shape={tuple(p.shape)}"

    def _check_finite(self) -> bool:
        """True when every gradient is finite. Ranks sharing a DTensor mesh agree (one all-reduce per process group),
        so a non-finite shard on one rank skips or stops the step on all of them."""
        local: list[tuple[int, int, torch.Tensor]] = []
        shared: dict[Any, list[tuple[int, int, torch.Tensor | None]]] = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                pg = self._agreement_groups.get(p)
                if pg is None:
                    if p.grad is not None:
                        local.append((gi, pi, local_tensor(p.grad)))
                else:
                    shared.setdefault(pg, []).append((gi, pi, None if p.grad is None else local_tensor(p.grad)))
        grads = [g for _, _, g in local] + [g for entries in shared.values() for _, _, g in entries if g is not None]
        if not grads:
            return True
        # One pass per gradient and one host sync: a NaN or Inf anywhere makes the sum non-finite. A finite
        # gradient whose float32 sum overflows is re-checked element by element, so no step is refused wrongly.
        # (isfinite().all() costs about 30x a sum on CPU.)
        sums = torch.stack([g.sum(dtype=torch.float32).to(grads[0].device) for g in grads]).isfinite().cpu()
        flags = torch.tensor([bool(ok) or bool(torch.isfinite(g).all()) for g, ok in zip(grads, sums.tolist())])
        bad = [(gi, pi) for (gi, pi, _), ok in zip(local, flags[: len(local)].tolist()) if not ok]
        it = iter(flags[len(local) :].tolist())
        for pg, entries in shared.items():
            vec = torch.tensor([[g is not None, g is not None and not next(it)] for _, _, g in entries], dtype=torch.int64)
            dist.all_reduce(vec, group=pg)
            world = dist.get_world_size(pg)
            for (gi, pi, _), (has_grad, nonfinite) in zip(entries, vec.tolist()):
                if has_grad not in (0, world):
                    raise ValueError(
                        f"parameter {self._param_name(gi, pi)!r} has a gradient on {has_grad} of {world} ranks; a sharded "
                        "parameter needs its gradient on every rank of its mesh or on none (as FSDP2 produces it)"
                    )
                if nonfinite:
                    bad.append((gi, pi))
        if not bad:
            return True
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            return False
        names = [self._param_name(gi, pi) for gi, pi in sorted(bad)]
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or Inf) in {len(names)} parameter(s): {names[:8]}; no weight was changed. "
            "Lower the learning rate, clip gradients (max_grad_norm), or pass nonfinite='skip' to skip such steps."
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step.

        Args:
            closure (`Callable`, *optional*): Re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if dist.is_available() and dist.is_initialized():
            for gi in range(len(self.param_groups)):
                self._register_dtensors(gi)
        if not self._check_finite():
            return loss
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        if group["use_aurora"]:
            self._aurora_group(group)
        else:
            self._adamw_group(group)

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        """The momentum buffer of `p` (its rank-local piece for a DTensor)."""
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return local_tensor(state["momentum_buffer"])

    def _carried_row_scale(self, p: torch.Tensor, group: Mapping[str, Any]) -> torch.Tensor | None:
        """The carried row correction of `p` (its rank-local piece for a DTensor), or `None`."""
        if not group["carry_row_scale"]:
            return None
        C = self.state[p].get("row_scale")
        if C is None or is_dtensor(C) or not is_dtensor(p):
            return local_tensor(C) if C is not None else None
        # A plain tensor for a DTensor parameter: state saved unsharded and loaded into a sharded run.
        layout = self._layouts[p]
        dim = _row_scale_dim(layout)
        if dim is None:
            return C
        return torch.split(C, layout.sizes(dim, C.shape), dim=dim)[layout.rank]

    def _apply_update(
        self,
        p: torch.Tensor,
        update: torch.Tensor,
        new_row_scale: torch.Tensor | None,
        group: Mapping[str, Any],
        scale: float = 1.0,
    ) -> None:
        """Carry the row correction, apply decoupled weight decay, then `p -= lr * scale * update`.

        For a DTensor `p`, `update` and `new_row_scale` are this rank's pieces (`new_row_scale` split on
        `_row_scale_dim`). `update` may be in another dtype than `p` (the Newton–Schulz one); it is added in
        `p`'s dtype without a separate cast.
        """
        if group["carry_row_scale"] and new_row_scale is not None:
            # Stored in the parameter dtype so that load_state_dict (which casts floating state to
            # the parameter dtype) restores exactly what was saved.
            # A copy: a piece received from another rank is a view into the exchange's byte buffer.
            C = new_row_scale.to(p.dtype, copy=True)
            if is_dtensor(p):
                layout = self._layouts[p]
                C = dtensor_like(C, layout, _row_scale_shape(layout.shape), _row_scale_dim(layout))
            self.state[p]["row_scale"] = C
        lr, wd = group["lr"], group["weight_decay"]
        w = local_tensor(p)
        if wd:
            w.mul_(1 - lr * wd)
        w.add_(update, alpha=-lr * scale)

    def _remote_exchanges(self, jobs: list[tuple[ShardLayout, RemoteJob]]) -> list[tuple[OwnerExchange, list[RemoteJob]]]:
        """Bucket matrix-sharded jobs by process group in first-seen order, owners balanced within a bucket."""
        buckets: dict[Any, tuple[ShardLayout, list[RemoteJob]]] = {}
        for layout, job in jobs:
            buckets.setdefault(layout.group, (layout, []))[1].append(job)
        out = []
        for pg, (layout, bucket) in buckets.items():
            for job, owner in zip(bucket, assign_owners([job.cost for job in bucket], layout.world)):
                job.owner = owner
            out.append((OwnerExchange(pg, layout.rank, layout.world, self.comm_stats), bucket))
        return out

    def _aurora_group(self, group: dict[str, Any]) -> None:
        """Momentum, then the balanced polar update of every matrix (same-shape matrices fused into batches; matrices
        sharded across ranks computed whole on an owner rank), then the weight update."""
        options = _direction_options(group)
        produces_C = group["carry_row_scale"] and group["pp_iterations"] > 0
        here: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # (param, X, C): whole matrices here
        remote: list[tuple[ShardLayout, RemoteJob]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            X = _momentum_step(local_tensor(p.grad), self._momentum_buffer(p), group["momentum"], group["nesterov"])
            C = self._carried_row_scale(p, group)
            layout = self._layouts.get(p)
            if layout is None or layout.whole_matrices_local:
                here.append((p, X, C))
                continue
            m, n = layout.shape[-2:]
            c_shape = _row_scale_shape(layout.shape)
            work = resolve_ns_dtype(group["ns_dtype"], X.device)
            inputs = [(X, layout.dim, layout.shape)] + ([(C, 0, c_shape)] if C is not None else [])
            outputs = [(layout.dim, layout.shape, work)] + ([(0, c_shape, p.dtype)] if produces_C and m != n else [])
            remote.append((layout, RemoteJob(-1, inputs, outputs, key=p, cost=polar_cost(layout.shape))))
        exchanges = self._remote_exchanges(remote)
        owned = [exchange.gather(bucket) for exchange, bucket in exchanges]
        works = [(X, C) for _, X, C in here] + [(full[0], full[1] if len(full) > 1 else None) for fulls in owned for full in fulls]
        results = _fused_directions(works, options)
        for (p, _, _), (update, C) in zip(here, results):
            self._apply_update(p, update, C, group, shape_scale(p.shape[-2], p.shape[-1], group["scale"]))
        done = iter(results[len(here) :])
        for (exchange, bucket), fulls in zip(exchanges, owned):
            outputs = []
            for _ in fulls:
                update, C = next(done)
                # The outputs every rank expects (RemoteJob.outputs): the row correction only when it is carried.
                outputs.append([update] + ([C] if produces_C and C is not None else []))
            for job, pieces in zip(bucket, exchange.scatter(bucket, outputs)):
                p = job.key
                scale = shape_scale(p.shape[-2], p.shape[-1], group["scale"])
                self._apply_update(p, pieces[0], pieces[1] if len(pieces) > 1 else None, group, scale)

    def _adamw_group(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["adamw_eps"]
        b1, b2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            # Elementwise: DTensors of any layout are updated through their local pieces.
            g, w = local_tensor(p.grad), local_tensor(p)
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            exp_avg, exp_avg_sq = local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"])
            exp_avg.lerp_(g, 1 - b1)
            exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (exp_avg_sq / (1 - b2**t)).sqrt_().add_(eps)
            if wd:
                w.mul_(1 - lr * wd)
            w.addcdiv_(exp_avg, denom, value=-lr / (1 - b1**t))
