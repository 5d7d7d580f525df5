"""Polar factor of a (batch of) matrices by Newton–Schulz iteration.

For ``X = U S Vᵀ`` the polar factor is ``U Vᵀ``: every non-zero singular value mapped to one.
Muon-family optimizers approximate it with a few steps of an odd matrix polynomial
``X <- a X + b (X Xᵀ) X + c (X Xᵀ)² X`` after scaling ``X`` so its spectral norm is at most one.
The step coefficients are the *schedule*:

- ``"tilde_quintic12"``: 12 steps of the simple quintic ``(2, -1.5, 0.5)`` (fixed points 0, 1, √2,
  super-attracting at 1) used by the Aurora reference release. Converges tightly but costs 12 steps.
- ``"jordan5"``: Keller Jordan's 5-step Muon schedule ``(3.4445, -4.7750, 2.0315)``. Fast, but leaves the
  singular values spread in roughly [0.7, 1.2], which is fine for Muon and loose for row balancing.
- ``"polar_express"``: the degree-5 per-step optimal schedule of Amsel et al., "The Polar Express"
  (arXiv 2505.16932), with their 1.01 safety factor. It contracts the spectrum far faster than the
  simple quintic, so a few steps give an accurate polar factor.

All functions act on the last two dimensions and batch over any leading ones, so a fused expert
tensor ``[E, out, in]`` is orthogonalized as ``E`` independent matrices in one batched computation.
"""

from __future__ import annotations

import functools

import torch


__all__ = ["NS_SCHEDULES", "DEFAULT_NS_STEPS", "cpu_has_native_bf16", "ns_coefficients", "polar_factor", "resolve_ns_dtype"]

# Polar Express degree-5 coefficients (arXiv 2505.16932, Algorithm 1), designed for a smallest
# normalized singular value of 1e-3; later steps converge to the fixed polynomial (1.875, -1.25, 0.375).
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
_POLAR_EXPRESS_TAIL = (1.875, -1.25, 0.375)
# The paper divides each step's polynomial by a safety factor so rounding cannot push a singular
# value past the basin of attraction; the input is then scaled by the same factor.
_PE_SAFETY = 1.01
_POLAR_EXPRESS = tuple(
    (a / _PE_SAFETY, b / _PE_SAFETY**3, c / _PE_SAFETY**5) for a, b, c in _POLAR_EXPRESS_RAW
)

NS_SCHEDULES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "tilde_quintic12": ((2.0, -1.5, 0.5),),
    "jordan5": ((3.4445, -4.7750, 2.0315),),
    "polar_express": _POLAR_EXPRESS + (_POLAR_EXPRESS_TAIL,),
}
"""Coefficient tables. A table shorter than the requested steps repeats its last entry."""

DEFAULT_NS_STEPS: dict[str, int] = {"tilde_quintic12": 12, "jordan5": 5, "polar_express": 6}
"""Steps used when ``steps`` is not given. Polar Express uses 6 (see docs/aurora.md for the accuracy table)."""

_INPUT_SCALE = {"tilde_quintic12": 1.0, "jordan5": 1.0, "polar_express": _PE_SAFETY}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def ns_coefficients(schedule: str, steps: int | None = None) -> list[tuple[float, float, float]]:
    """Per-step ``(a, b, c)`` coefficients of a Newton–Schulz schedule.

    Args:
        schedule (`str`): One of `NS_SCHEDULES` (`"tilde_quintic12"`, `"jordan5"`, `"polar_express"`).
        steps (`int`, *optional*): Number of steps; defaults to `DEFAULT_NS_STEPS[schedule]`.

    Returns:
        `list[tuple[float, float, float]]`: one coefficient triple per step.
    """
    if schedule not in NS_SCHEDULES:
        raise ValueError(f"ns_schedule={schedule!r} is not a known schedule; valid: {sorted(NS_SCHEDULES)}")
    if steps is None:
        steps = DEFAULT_NS_STEPS[schedule]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"ns_steps={steps!r} must be a positive integer")
    table = NS_SCHEDULES[schedule]
    return [table[min(i, len(table) - 1)] for i in range(steps)]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (x86 AVX512-BF16 or AMX-BF16).

    Read from the ``flags`` line of ``/proc/cpuinfo``; `False` where that file does not exist.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_ns_dtype(ns_dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Turn an ``ns_dtype`` setting into a dtype.

    ``"auto"`` is bfloat16 where bf16 matrix products are fast (CUDA; CPUs with AVX512-BF16 or AMX, see
    `cpu_has_native_bf16`) and float32 elsewhere. bf16 iterations cost the polar factor some accuracy
    (docs/aurora.md, "Precision"); pass ``"float32"`` where that matters.

    Args:
        ns_dtype (`str` or `torch.dtype`): `"auto"`, `"float32"`, `"bfloat16"`, `"float16"`, `"float64"` or a dtype.
        device (`torch.device`): Device the iteration runs on (decides `"auto"`).
    """
    if isinstance(ns_dtype, torch.dtype):
        return ns_dtype
    if ns_dtype == "auto":
        # Measured on an AVX512-BF16 EPYC, one thread: bf16 matmuls run about 4x faster than fp32; CPUs
        # without native bf16 emulate it and run slower than fp32.
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if fast else torch.float32
    if ns_dtype not in _DTYPES:
        raise ValueError(f"ns_dtype={ns_dtype!r} is not supported; valid: {['auto', *_DTYPES]}")
    return _DTYPES[ns_dtype]


def input_scale(schedule: str) -> float:
    """Factor the Frobenius norm is multiplied by before the iteration (Polar Express's safety factor, else 1)."""
    return _INPUT_SCALE[schedule]


def newton_schulz(Y: torch.Tensor, coeffs: list[tuple[float, float, float]]) -> torch.Tensor:
    """Run the iteration on a normalized batch ``Y`` of shape `[B, m, n]`, in ``Y``'s dtype and layout.

    The polynomial acts on the small Gram matrix: ``p(Y Yᵀ) Y`` for wide matrices, ``Y p(Yᵀ Y)`` (the same
    matrix) for tall ones. Working in the input's own orientation, not a transposed view of it, keeps the
    result contiguous in the parameter's layout; adding a transposed update to a parameter costs about 7x a
    plain add on CPU.
    """
    if Y.shape[-2] <= Y.shape[-1]:
        for a, b, c in coeffs:
            A = torch.bmm(Y, Y.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            Y = torch.baddbmm(Y, B, Y, beta=a, alpha=1.0)
    else:
        for a, b, c in coeffs:
            A = torch.bmm(Y.mT, Y)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            Y = torch.baddbmm(Y, Y, B, beta=a, alpha=1.0)
    return Y


@torch.no_grad()
def polar_factor(
    X: torch.Tensor,
    schedule: str = "polar_express",
    steps: int | None = None,
    dtype: str | torch.dtype = "float32",
    eps: float = 1e-7,
) -> torch.Tensor:
    """Approximate polar factor ``U Vᵀ`` of each matrix in ``X`` by Newton–Schulz iteration.

    Args:
        X (`torch.Tensor` of shape `[..., m, n]`): Input; leading dimensions are an independent batch.
        schedule (`str`, *optional*, defaults to `"polar_express"`): Coefficient schedule, see `NS_SCHEDULES`.
        steps (`int`, *optional*): Number of iterations; defaults to `DEFAULT_NS_STEPS[schedule]`.
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"float32"`): Precision of the iteration
            (`"auto"`: see `resolve_ns_dtype`).
        eps (`float`, *optional*, defaults to 1e-7): Added to the Frobenius norm before normalizing, so an
            all-zero matrix maps to zero instead of NaN.

    Returns:
        `torch.Tensor`: same shape as `X`, in the iteration dtype.
    """
    if X.ndim < 2:
        raise ValueError(f"X must have at least 2 dimensions [..., m, n], got shape {tuple(X.shape)}")
    coeffs = ns_coefficients(schedule, steps)
    work_dtype = resolve_ns_dtype(dtype, X.device)
    lead, (m, n) = X.shape[:-2], X.shape[-2:]
    Y = X.to(work_dtype).reshape(-1, m, n)
    # Frobenius norm bounds the spectral norm, so after this every singular value is <= 1.
    norm = Y.norm(dim=(-2, -1), keepdim=True)
    if bool(norm.isinf().any()):  # finite entries whose squares overflow: the polar factor is scale-free
        Y = Y / Y.abs().amax(dim=(-2, -1), keepdim=True)
        norm = Y.norm(dim=(-2, -1), keepdim=True)
    Y = newton_schulz(Y / (norm * _INPUT_SCALE[schedule] + eps), coeffs)
    return Y.reshape(*lead, m, n)
