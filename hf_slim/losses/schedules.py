"""Schedules of SlimQwen's loss weights λ (KD) and β (MTP) over training progress."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


__all__ = ["SCHEDULE_KINDS", "LossWeightSchedule", "cosine_schedule", "linear_schedule"]

SCHEDULE_KINDS = ("linear", "cosine", "constant")


def _check_progress(progress: float) -> float:
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be a number in [0, 1] (fraction of training done), got {progress!r}.")
    return float(progress)


def linear_schedule(start: float, end: float, progress: float) -> float:
    """Linear interpolation from `start` (progress 0) to `end` (progress 1).

    Args:
        start (`float`): Value at the start of training.
        end (`float`): Value at the end of training.
        progress (`float`): Fraction of training done, in [0, 1].

    Returns:
        `float`: `start + (end - start) · progress`.
    """
    p = _check_progress(progress)
    return float(start + (end - start) * p)


def cosine_schedule(start: float, end: float, progress: float) -> float:
    """Half-cosine from `start` (progress 0) to `end` (progress 1), flat at both ends.

    Args:
        start, end, progress: As in [`linear_schedule`].

    Returns:
        `float`: `end + (start - end) · (1 + cos(π · progress)) / 2`.
    """
    p = _check_progress(progress)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p)))


_SCHEDULES: dict[str, Callable[[float, float, float], float]] = {
    "linear": linear_schedule,
    "cosine": cosine_schedule,
    "constant": lambda start, end, progress: float(start + 0.0 * _check_progress(progress)),
}


@dataclass
class LossWeightSchedule:
    """Schedules of SlimQwen's KD weight λ and MTP weight β over training progress.

    Defaults are SlimQwen's: λ linear 1.0 -> 0.75, β cosine 0.3 -> 0.1. A `"constant"` schedule keeps the start
    value.

    Args:
        lambda_start (`float`, *optional*, defaults to 1.0): λ at progress 0, in [0, 1].
        lambda_end (`float`, *optional*, defaults to 0.75): λ at progress 1, in [0, 1].
        lambda_schedule (`str`, *optional*, defaults to `"linear"`): `"linear"`, `"cosine"` or `"constant"`.
        beta_start (`float`, *optional*, defaults to 0.3): β at progress 0, >= 0.
        beta_end (`float`, *optional*, defaults to 0.1): β at progress 1, >= 0.
        beta_schedule (`str`, *optional*, defaults to `"cosine"`): `"linear"`, `"cosine"` or `"constant"`.
    """

    lambda_start: float = 1.0
    lambda_end: float = 0.75
    lambda_schedule: str = "linear"
    beta_start: float = 0.3
    beta_end: float = 0.1
    beta_schedule: str = "cosine"

    def __post_init__(self) -> None:
        for name in ("lambda_start", "lambda_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1] (λ weighs KD against LM), got {value!r}.")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
                raise ValueError(f"{name} must be a number >= 0 (β weighs the MTP terms), got {value!r}.")
        for name in ("lambda_schedule", "beta_schedule"):
            value = getattr(self, name)
            if value not in SCHEDULE_KINDS:
                raise ValueError(f"{name} must be one of {SCHEDULE_KINDS}, got {value!r}.")

    def lam(self, progress: float) -> float:
        """λ at `progress` in [0, 1]."""
        return _SCHEDULES[self.lambda_schedule](self.lambda_start, self.lambda_end, progress)

    def beta(self, progress: float) -> float:
        """β at `progress` in [0, 1]."""
        return _SCHEDULES[self.beta_schedule](self.beta_start, self.beta_end, progress)

    def at_step(self, step: int, max_steps: int) -> tuple[float, float]:
        """(λ, β) after `step` of `max_steps` optimizer steps (progress clamped to 1 past the end).

        Args:
            step (`int`): Optimizer steps done, >= 0.
            max_steps (`int`): Total optimizer steps, >= 1.

        Returns:
            `tuple[float, float]`: `(λ, β)`.
        """
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}.")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}.")
        progress = min(step / max_steps, 1.0)
        return self.lam(progress), self.beta(progress)
