"""Register ``optim="aurora"`` and ``optim="aurora_lora"`` with transformers' Trainer.

How transformers 5.x picks an optimizer, and where we hook in:

- `TrainingArguments.__post_init__` runs ``self.optim = OptimizerNames(self.optim)``, and
  `HfArgumentParser` (which `TrlParser` extends) builds the ``--optim`` choices from
  ``[x.value for x in OptimizerNames]`` when the parser is created. So the name must be a member of the
  `OptimizerNames` enum; a string alone is rejected before any Trainer code runs.
- `Trainer.create_optimizer` calls `Trainer.get_optimizer_cls_and_kwargs`, which looks the name up in
  ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` (``name -> handler(ctx) -> (cls_or_factory, kwargs)``).
  A returned object that is not an `Optimizer` subclass is a factory, called as ``factory()(model, **kwargs)``:
  that hands us the model, so the parameter split can use names (embeddings, head, routers, LoRA pairs).

We therefore (1) add ``AURORA``/``AURORA_LORA`` members to `OptimizerNames` the way `enum` itself adds
members (``_add_member_`` on Python >= 3.13, the same three tables by hand before that), and (2) put a
handler for each into ``_OPTIMIZER_HANDLERS``. This keeps every public route working: the
`TrainingArguments(optim=...)` constructor, ``--optim aurora`` through HfArgumentParser / TrlParser,
`TrainingArguments.set_optimizer`, `to_dict`/JSON (the member is a `str`), and TRL configs (subclasses of
`TrainingArguments`). Overriding `Trainer.create_optimizer` instead would not reach TRL trainers or
the argument validation. Registration is idempotent; if a future transformers ships its own ``"aurora"``
member or handler we leave it in place and log a warning.

Training arguments map onto Aurora as follows: ``learning_rate`` is the Aurora learning rate and, unless
``optim_args`` sets ``adamw_lr``, also the AdamW learning rate; ``weight_decay`` applies to both groups
(never to norms and biases); ``adam_beta1/2`` and ``adam_epsilon`` configure the AdamW group. The shape
scale defaults to ``match_rms_adamw`` on this route (Moonlight: update RMS matched to AdamW), so one
learning rate tuned for AdamW works for both groups; pass ``optim_args="scale=spectral"`` for Muon units.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from typing import Any

from torch import nn

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

logger = logging.getLogger(__name__)

AURORA = "aurora"
AURORA_LORA = "aurora_lora"


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
        return Aurora(aurora_param_groups(model, router=router), **kwargs)


class AuroraLoRAFactory:
    """Trainer optimizer factory building `AuroraLoRA` on `aurora_lora_param_groups` of a PEFT model."""

    def __call__(self, model: nn.Module, **kwargs: Any) -> AuroraLoRA:
        return AuroraLoRA(aurora_lora_param_groups(model), **kwargs)


def _get_aurora(ctx: Any) -> tuple[type, dict[str, Any]]:
    return AuroraFactory, aurora_kwargs_from_training_args(ctx.args, ctx.optim_args, lora=False)


def _get_aurora_lora(ctx: Any) -> tuple[type, dict[str, Any]]:
    return AuroraLoRAFactory, aurora_kwargs_from_training_args(ctx.args, ctx.optim_args, lora=True)


_HANDLERS = {AURORA: _get_aurora, AURORA_LORA: _get_aurora_lora}


def _add_enum_member(enum_cls: Any, name: str, value: str) -> Any:
    if value in enum_cls._value2member_map_:
        return enum_cls._value2member_map_[value]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13
        enum_cls._add_member_(name, member)
    else:
        enum_cls._member_map_[name] = member
        enum_cls._member_names_.append(name)
        type.__setattr__(enum_cls, name, member)
    enum_cls._value2member_map_[value] = member
    return member


def _register_loaded() -> None:
    # Register with whichever of the two transformers modules is already loaded; import nothing.
    training_args = sys.modules.get("transformers.training_args")
    if training_args is not None and hasattr(training_args, "OptimizerNames"):
        for value in _HANDLERS:
            _add_enum_member(training_args.OptimizerNames, value.upper(), value)
    trainer_optimizer = sys.modules.get("transformers.trainer_optimizer")
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if trainer_optimizer is not None and not isinstance(handlers, dict):
        logger.warning("transformers has no trainer_optimizer._OPTIMIZER_HANDLERS; optim='aurora' is not registered")
        return
    if handlers is None:
        return
    for value, handler in _HANDLERS.items():
        existing = handlers.get(value)
        if existing is not None and getattr(existing, "__module__", None) != __name__:
            logger.warning(f"transformers already defines optim={value!r}; keeping its implementation")
            continue
        member = _add_enum_member(training_args.OptimizerNames, value.upper(), value)
        handlers[member] = handler


def register_aurora_with_transformers() -> bool:
    """Make ``optim="aurora"`` and ``optim="aurora_lora"`` valid `TrainingArguments.optim` values now.

    Idempotent. ``import hf_slim.optim`` already arranges registration without importing the (slow)
    transformers training modules itself: it registers at once if they are loaded, else right after
    they load. Call this to force it. Returns `False` when transformers is not installed.
    """
    try:
        import transformers.trainer_optimizer  # noqa: F401
        import transformers.training_args  # noqa: F401
    except ImportError:
        return False
    _register_loaded()
    return True


_WATCHED = ("transformers.training_args", "transformers.trainer_optimizer")


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs `_register_loaded` right after a watched transformers module finishes executing."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            _register_loaded()

        loader.exec_module = exec_module
        return spec


def _install() -> None:
    _register_loaded()
    if all(name in sys.modules for name in _WATCHED):
        return
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_install()
