"""Register ``optim="aurora"`` and ``optim="aurora_lora"`` with transformers' Trainer.

transformers has no public registry for ``optim=`` names, so the touches of its internals live in one module,
`hf_slim.integrations.transformers_optim` (what it touches and why is listed there, each checked by
tests/test_transformers_touchpoints.py). Through it each name becomes an `OptimizerNames` member (so the
`TrainingArguments(optim=...)` constructor, ``--optim aurora`` through HfArgumentParser / TrlParser,
`TrainingArguments.set_optimizer`, `to_dict`/JSON and every TRL config accept it) with a handler returning a
factory: the Trainer calls ``factory()(model, **kwargs)``, which hands us the model, so the parameter split can use
names (embeddings, head, routers, LoRA pairs). Overriding `Trainer.create_optimizer` instead would not reach TRL
trainers or the argument validation. The public route needs no registration:
``Trainer(optimizer_cls_and_kwargs=(AuroraFactory, {...}))``. Registration is idempotent and happens right after
transformers' training modules load, so ``import hf_slim`` does not import them; if a future transformers ships its
own ``"aurora"`` we leave it in place and log a warning. TRL's ``trl`` command does not import hf_slim, so it does not
know the names; ``hf-slim trl sft --optim aurora ...`` (`hf_slim.cli.trl`) runs TRL's scripts with them registered.
Plain ``optim="aurora"`` on a model with trainable LoRA factors logs a one-time warning recommending ``aurora_lora``.

Training arguments map onto Aurora as follows: ``learning_rate`` is the Aurora learning rate and, unless
``optim_args`` sets ``adamw_lr``, also the AdamW learning rate; ``weight_decay`` applies to both groups
(never to norms and biases); ``adam_beta1/2`` and ``adam_epsilon`` configure the AdamW group. The shape
scale defaults to ``match_rms_adamw`` on this route (Moonlight: update RMS matched to AdamW), so one
learning rate tuned for AdamW works for both groups; pass ``optim_args="scale=spectral"`` for Muon units.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.utils import logging

from ..integrations.transformers_optim import register_optimizers, register_optimizers_when_loaded
from .aurora import AURORA_PRESETS, Aurora, aurora_param_groups
from .lora import AuroraLoRA, aurora_lora_param_groups


__all__ = [
    "AURORA_OPTIM_ARGS",
    "AURORA_LORA_OPTIM_ARGS",
    "AuroraFactory",
    "AuroraLoRAFactory",
    "aurora_kwargs_from_training_args",
    "register_aurora_with_transformers",
]

AURORA = "aurora"
AURORA_LORA = "aurora_lora"

# Under transformers' logger hierarchy (as the rest of hf_slim), so `transformers.logging.set_verbosity_*` governs it.
logger = logging.get_logger(f"transformers.{__name__}")
_warned_lora = False  # the factor-wise warning below is given once per process


def _bool(key: str, value: str) -> bool:
    low = value.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise ValueError(f"optim_args {key}={value!r} must be a boolean (true/false)")


def _int_or_none(key: str, value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"optim_args {key}={value!r} must be an integer") from None


def _float(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"optim_args {key}={value!r} must be a number") from None


def _str(key: str, value: str) -> str:
    return value


AURORA_OPTIM_ARGS: dict[str, Any] = {
    "preset": _str,
    "momentum": _float,
    "nesterov": _bool,
    "ns_schedule": _str,
    "ns_steps": _int_or_none,
    "pp_iterations": _int_or_none,
    "pp_beta": _float,
    "carry_row_scale": _bool,
    "scale": _str,
    "ns_dtype": _str,
    "eps": _float,
    "adamw_lr": _float,
    "adamw_weight_decay": _float,
    "nonfinite": _str,
    "router": _str,
}
"""Keys accepted in ``optim_args`` for ``optim="aurora"`` and how each value is parsed."""

AURORA_LORA_OPTIM_ARGS: dict[str, Any] = {
    **{k: v for k, v in AURORA_OPTIM_ARGS.items() if k != "router"},
    "lora_damping": _float,
}
"""Keys accepted in ``optim_args`` for ``optim="aurora_lora"``."""


def aurora_kwargs_from_training_args(args: Any, optim_args: dict[str, str], lora: bool = False) -> dict[str, Any]:
    """Translate `TrainingArguments` plus parsed ``optim_args`` into keyword arguments for the factories.

    Args:
        args (`TrainingArguments`): The training arguments.
        optim_args (`dict[str, str]`): ``optim_args`` parsed into strings (transformers' format ``k=v,k=v``).
        lora (`bool`, *optional*, defaults to `False`): Validate against the ``aurora_lora`` keys.

    Returns:
        `dict[str, Any]`: keyword arguments for `AuroraFactory` / `AuroraLoRAFactory`.
    """
    table = AURORA_LORA_OPTIM_ARGS if lora else AURORA_OPTIM_ARGS
    name = AURORA_LORA if lora else AURORA
    unknown = sorted(set(optim_args) - set(table))
    if unknown:
        raise ValueError(f"optim_args key(s) {unknown} are not valid for optim={name!r}; valid keys: {sorted(table)}")
    parsed = {k: table[k](k, v) for k, v in optim_args.items()}
    preset = parsed.pop("preset", None)
    kwargs: dict[str, Any] = {}
    if preset is not None:
        if preset not in AURORA_PRESETS:
            raise ValueError(f"optim_args preset={preset!r} is not known; valid: {sorted(AURORA_PRESETS)}")
        # The Trainer owns the learning rate and weight decay (its scheduler drives them).
        kwargs.update({k: v for k, v in AURORA_PRESETS[preset].items() if k not in ("lr", "weight_decay")})
    kwargs.setdefault("scale", "match_rms_adamw")
    kwargs.update(
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        adamw_lr=args.learning_rate,
        adamw_weight_decay=args.weight_decay,
        adamw_betas=(args.adam_beta1, args.adam_beta2),
        adamw_eps=args.adam_epsilon,
    )
    kwargs.update(parsed)
    return kwargs


class AuroraFactory:
    """Trainer optimizer factory: ``AuroraFactory()(model, **kwargs)`` builds `Aurora` on `aurora_param_groups`.

    Also usable directly: ``Trainer(..., optimizer_cls_and_kwargs=(AuroraFactory, {"lr": 0.02}))``.
    The ``router`` keyword is passed to `aurora_param_groups`; everything else to `Aurora`.
    """

    def __call__(self, model: nn.Module, router: str = "adamw", **kwargs: Any) -> Aurora:
        _warn_if_lora(model)
        return Aurora(aurora_param_groups(model, router=router), **kwargs)


def _warn_if_lora(model: nn.Module) -> None:
    """Once per process: plain Aurora on trainable LoRA factors orthogonalizes A and B separately (factor-wise), which
    depends on how ΔW = B·A is split between them; `optim="aurora_lora"` updates each pair jointly."""
    global _warned_lora
    if _warned_lora:
        return
    names = [n for n, p in model.named_parameters() if p.requires_grad and (".lora_A." in n or ".lora_B." in n)]
    if names:
        _warned_lora = True
        logger.warning(
            f"optim='aurora' sees {len(names)} trainable LoRA factors (e.g. {names[0]}) and updates each factor "
            "separately, so the step depends on how B @ A is split between them. For a PEFT LoRA model use "
            "optim='aurora_lora' (`--optim aurora_lora`, AuroraLoRAFactory): the whitened joint update of each pair."
        )


class AuroraLoRAFactory:
    """Trainer optimizer factory building `AuroraLoRA` on `aurora_lora_param_groups` of a PEFT model."""

    def __call__(self, model: nn.Module, **kwargs: Any) -> AuroraLoRA:
        return AuroraLoRA(aurora_lora_param_groups(model), **kwargs)


def _get_aurora(args: Any, optim_args: dict[str, str]) -> tuple[type, dict[str, Any]]:
    return AuroraFactory, aurora_kwargs_from_training_args(args, optim_args, lora=False)


def _get_aurora_lora(args: Any, optim_args: dict[str, str]) -> tuple[type, dict[str, Any]]:
    return AuroraLoRAFactory, aurora_kwargs_from_training_args(args, optim_args, lora=True)


_HANDLERS = {AURORA: _get_aurora, AURORA_LORA: _get_aurora_lora}


def register_aurora_with_transformers() -> bool:
    """Make ``optim="aurora"`` and ``optim="aurora_lora"`` valid `TrainingArguments.optim` values now.

    Idempotent. ``import hf_slim.optim`` already arranges registration without importing the (slow)
    transformers training modules itself: it registers at once if they are loaded, else right after
    they load. Call this to force it, or to get the error when registration is impossible.

    Returns:
        `bool`: `True` once registered, `False` when transformers is not installed.

    Raises:
        `hf_slim.integrations.TransformersCompatError`: the installed transformers lacks an internal the
            registration relies on (the message names it and the version).
    """
    try:
        import transformers.trainer_optimizer  # noqa: F401
        import transformers.training_args  # noqa: F401
    except ImportError:
        return False
    register_optimizers(_HANDLERS)
    return True


register_optimizers_when_loaded(_HANDLERS)
