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
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .polar import NS_SCHEDULES, ns_coefficients, polar_factor, resolve_ns_dtype


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
    # correction carried across steps. Costs about one Muon step (see docs/aurora.md).
    "default": {
        "ns_schedule": "polar_express",
        "ns_steps": 6,
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
    m, n = X.shape[-2], X.shape[-1]
    if m == n or pp_iterations == 0:
        return polar_factor(X, ns_schedule, ns_steps, ns_dtype, eps).float(), None
    transposed = m < n
    T = (X.mT if transposed else X).float()
    tall, small = T.shape[-2], T.shape[-1]
    target = small / tall
    row_norm = T.norm(dim=-1, keepdim=True)
    D = 1.0 / row_norm.clamp(min=eps)
    C = torch.ones_like(row_norm) if row_scale is None else row_scale.float()
    for _ in range(pp_iterations):
        O = polar_factor(D * C * T, ns_schedule, ns_steps, ns_dtype, eps).float()
        row_sq = O.square().sum(dim=-1, keepdim=True).clamp(min=eps * eps)
        C = C * (target / row_sq).pow(pp_beta)
    # C leaves this call only as carried state: rescale it to mean one (the polar factor ignores a
    # global scale) and bound it, so a row whose gradient is exactly zero cannot grow it without end.
    C = torch.where(row_norm > eps, C, torch.ones_like(C))
    C = (C / C.mean(dim=-2, keepdim=True)).clamp(min=1e-4, max=1e4)
    direction = O.mT if transposed else O
    return direction, C


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


# --------------------------------------------------------------------------------------------------
# Parameter routing
# --------------------------------------------------------------------------------------------------

# A router/gate projection: `mlp.gate`, `router`, `shared_expert_gate` (not `gate_proj`/`gate_up_proj`).
_ROUTER_RE = re.compile(r"(?:^|[._])(?:gate|router)$")
_EMBED_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|embeddings?|lm_head)(?:\.|$)")


def aurora_param_groups(
    model: nn.Module,
    *,
    router: str = "adamw",
    lr: float | None = None,
    weight_decay: float | None = None,
    adamw_lr: float | None = None,
    adamw_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into Aurora and AdamW groups by a plain rule.

    Rule (first match wins):
      1. embeddings (`nn.Embedding` modules and names like `embed_tokens`, `wte`) and the output head
         (`model.get_output_embeddings()`, `lm_head`) go to AdamW, with weight decay;
      2. router / gate projections (module name `gate`, `router` or ending in `_gate`, e.g. `mlp.gate`,
         `shared_expert_gate`) go to AdamW by default (``router="adamw"``) or Aurora (``router="aurora"``):
         a router's rows are experts. Measured (docs/aurora.md, "Routers: AdamW or Aurora"; 8-expert top-2
         Qwen3-MoE, hidden 64, 300 steps, 3 seeds): the same validation loss either way (3.773 vs 3.774 with
         the aux loss), but ``router="aurora"`` keeps expert load more balanced (load CV 0.62 vs 0.95,
         starved experts 4% vs 15%), also at a lower router lr. AdamW stays the default because the loss
         does not improve and the scale was tiny; pass ``router="aurora"`` when load balance matters;
      3. 2D weights go to Aurora; 3D weights of a module whose name ends in `experts` (transformers' fused
         `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) go to Aurora as E batched matrices;
      4. everything else (norms, biases, 1D, convolutions) goes to AdamW without weight decay.

    Args:
        model (`nn.Module`): The model; only parameters with `requires_grad=True` are returned.
        router (`str`, *optional*, defaults to `"adamw"`): Where router weights go: `"adamw"` or `"aurora"`.
        lr, weight_decay (`float`, *optional*): Set on the Aurora group when given.
        adamw_lr, adamw_weight_decay (`float`, *optional*): Set on the AdamW groups when given.

    Returns:
        `list[dict]`: groups with `params` as `(name, tensor)` pairs (so the optimizer records
        `param_names`) and `use_aurora` set; empty groups are dropped.
    """
    if router not in ("adamw", "aurora"):
        raise ValueError(f"router={router!r} is not supported; valid: ['adamw', 'aurora']")
    embed_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embed_ids.update(id(p) for p in module.parameters(recurse=False))
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if isinstance(out_emb, nn.Module):
        embed_ids.update(id(p) for p in out_emb.parameters(recurse=False))

    aurora, adamw_decay, adamw_plain = [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        if id(p) in embed_ids or _EMBED_RE.search(name):
            adamw_decay.append((name, p))
        elif p.ndim == 2 and min(p.shape) > 1 and _ROUTER_RE.search(module_name):
            (aurora if router == "aurora" else adamw_decay).append((name, p))
        elif p.ndim == 2 and min(p.shape) > 1:
            aurora.append((name, p))
        elif p.ndim == 3 and module_name.endswith("experts") and min(p.shape[-2:]) > 1:
            aurora.append((name, p))
        else:
            adamw_plain.append((name, p))

    main = {"params": aurora, "use_aurora": True}
    return _with_adamw_groups(main, adamw_decay, adamw_plain, lr, weight_decay, adamw_lr, adamw_weight_decay)


def _with_adamw_groups(
    main: dict[str, Any],
    decay: list[tuple[str, nn.Parameter]],
    plain: list[tuple[str, nn.Parameter]],
    lr: float | None,
    weight_decay: float | None,
    adamw_lr: float | None,
    adamw_weight_decay: float | None,
) -> list[dict[str, Any]]:
    """The Aurora group `main` with `lr` / `weight_decay` set when given, then the AdamW groups: `decay` with
    `adamw_weight_decay` when given, `plain` without weight decay, `adamw_lr` on both when given. Empty groups are
    dropped."""
    groups: list[dict[str, Any]] = []
    for group, group_lr, group_wd in (
        (main, lr, weight_decay),
        ({"params": decay, "use_aurora": False}, adamw_lr, adamw_weight_decay),
        ({"params": plain, "use_aurora": False}, adamw_lr, 0.0),
    ):
        if not group["params"]:
            continue
        if group_lr is not None:
            group["lr"] = group_lr
        if group_wd is not None:
            group["weight_decay"] = group_wd
        groups.append(group)
    return groups


# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------


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
        ns_dtype (`str`, *optional*, defaults to `"auto"`): Newton–Schulz precision (bf16 on CUDA, fp32 on CPU).
        eps (`float`, *optional*, defaults to 1e-7): Norm floor.
        adamw_lr (`float`, *optional*, defaults to 3e-4): Learning rate of AdamW groups that set none.
        adamw_betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.95)`): AdamW betas.
        adamw_eps (`float`, *optional*, defaults to 1e-8): AdamW epsilon.
        adamw_weight_decay (`float`, *optional*, defaults to 0.0): Weight decay of AdamW groups that set none.
        nonfinite (`str`, *optional*, defaults to `"error"`): On a NaN/Inf gradient, `"error"` raises
            `NonFiniteGradientError` naming the parameter before anything is written; `"skip"` leaves
            weights and state untouched for that step and counts it in `skipped_steps`.

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
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": bool(nesterov),
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
        if group["use_aurora"]:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"an Aurora group (use_aurora=True) holds a parameter of shape {tuple(p.shape)}; "
                        "Aurora needs matrices [..., m, n]: put 1D parameters in a use_aurora=False group"
                    )

    @classmethod
    def from_preset(cls, params: Iterable[Any], preset: str = "default", **overrides: Any) -> "Aurora":
        """Build an optimizer from a named configuration in `AURORA_PRESETS`, with keyword overrides.

        Args:
            params (iterable): As for `Aurora`.
            preset (`str`, *optional*, defaults to `"default"`): `"default"`, `"reference"` or `"muon"`.
            overrides: Any `Aurora` keyword argument; wins over the preset.
        """
        if preset not in AURORA_PRESETS:
            raise ValueError(f"preset={preset!r} is not known; valid: {sorted(AURORA_PRESETS)}")
        return cls(params, **{**AURORA_PRESETS[preset], **overrides})

    def _check_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        # One reduction and one host sync for the whole step.
        finite = torch.stack([torch.isfinite(g).all().to(grads[0].device) for g in grads]).all()
        if bool(finite):
            return True
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            return False
        bad = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    bad.append(names[pi] if names else f"param_groups[{gi}]['params'][{pi}] shape={tuple(p.shape)}")
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or Inf) in {len(bad)} parameter(s): {bad[:8]}; no weight was changed. "
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
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]

    def _carried_row_scale(self, p: torch.Tensor, group: Mapping[str, Any]) -> torch.Tensor | None:
        return self.state[p].get("row_scale") if group["carry_row_scale"] else None

    def _apply_update(
        self, p: torch.Tensor, update: torch.Tensor, new_row_scale: torch.Tensor | None, group: Mapping[str, Any]
    ) -> None:
        """Carry the row correction, apply decoupled weight decay, then `p -= lr * update`."""
        if group["carry_row_scale"] and new_row_scale is not None:
            # Stored in the parameter dtype so that load_state_dict (which casts floating state to
            # the parameter dtype) restores exactly what was saved.
            self.state[p]["row_scale"] = new_row_scale.to(p.dtype)
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            p.mul_(1 - lr * wd)
        p.add_(update.to(p.dtype), alpha=-lr)

    def _aurora_group(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            update, new_row_scale = aurora_update(
                p.grad, self._momentum_buffer(p), momentum=group["momentum"], nesterov=group["nesterov"],
                row_scale=self._carried_row_scale(p, group), scale=group["scale"], **_direction_options(group),
            )  # fmt: skip
            self._apply_update(p, update, new_row_scale, group)

    def _adamw_group(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["adamw_eps"]
        b1, b2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            state["exp_avg"].lerp_(g, 1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(eps)
            if wd:
                p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))
