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
from .lora import AuroraLoRA, aurora_lora_param_groups, lora_pair_update
from .polar import NS_SCHEDULES, ns_coefficients, polar_factor
from .trainer import AuroraFactory, AuroraLoRAFactory, register_aurora_with_transformers


__all__ = [
    "AURORA_PRESETS",
    "NS_SCHEDULES",
    "Aurora",
    "AuroraFactory",
    "AuroraLoRA",
    "AuroraLoRAFactory",
    "NonFiniteGradientError",
    "aurora_direction",
    "aurora_lora_param_groups",
    "aurora_param_groups",
    "aurora_update",
    "lora_pair_update",
    "ns_coefficients",
    "polar_factor",
    "register_aurora_with_transformers",
    "shape_scale",
]
