"""Optimizers: Aurora (leverage-aware orthogonalized updates), its LoRA mode, and Trainer registration.

Importing this package registers ``optim="aurora"`` and ``optim="aurora_lora"`` with
`transformers.TrainingArguments` / `Trainer` (and so TRL configs and ``--optim`` on the command line).
"""

from .aurora import (
    AURORA_PRESETS,
    Aurora,
    NonFiniteGradientError,
    aurora_direction,
    aurora_param_groups,
    aurora_update,
    shape_scale,
)
from .polar import NS_SCHEDULES, ns_coefficients, polar_factor


__all__ = [
    "AURORA_PRESETS",
    "NS_SCHEDULES",
    "Aurora",
    "NonFiniteGradientError",
    "aurora_direction",
    "aurora_param_groups",
    "aurora_update",
    "ns_coefficients",
    "polar_factor",
    "shape_scale",
]
