"""Optimizers: Aurora (leverage-aware orthogonalized updates), its LoRA mode, and Trainer registration.

Importing this package registers ``optim="aurora"`` and ``optim="aurora_lora"`` with
`transformers.TrainingArguments` / `Trainer` (and so TRL configs and ``--optim`` on the command line); the
transformers internals that takes are all in `hf_slim.integrations.transformers_optim`.
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
    "NeuronHealthCallback",
    "NonFiniteGradientError",
    "aurora_direction",
    "aurora_lora_param_groups",
    "aurora_param_groups",
    "aurora_update",
    "lora_pair_update",
    "neuron_update_norms",
    "ns_coefficients",
    "polar_factor",
    "register_aurora_with_transformers",
    "shape_scale",
]


def __getattr__(name: str):
    # The callback subclasses transformers.TrainerCallback, whose import pulls in the training stack
    # (~2 s); load it on first use so `import hf_slim` stays fast.
    if name in ("NeuronHealthCallback", "neuron_update_norms"):
        from . import health

        return getattr(health, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
