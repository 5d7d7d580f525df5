"""Every touch of transformers' optimizer selection, for registering extra ``optim=`` names.

transformers (checked in 5.24) has no public way to add an optimizer name. `TrainingArguments.__post_init__`
and `TrainingArguments.set_optimizer` run ``OptimizerNames(optim)``, and `HfArgumentParser` (so `TrlParser` and
the ``trl`` CLI) builds the ``--optim`` choices from ``[x.value for x in OptimizerNames]`` when a parser is
created. `Trainer.get_optimizer_cls_and_kwargs` then looks the name up in the private
``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``. The public routes, `Trainer(optimizer_cls_and_kwargs=...)`
and `Trainer(optimizers=...)`, take an optimizer but not a name: they need nothing from this module, but they do not
reach ``optim="aurora"`` in `TrainingArguments`, TRL configs or ``--optim`` on a command line.

What this module touches (``TOUCH_POINTS``), and outside transformers:

- Python's `enum` internals, to add a member to an existing enum: ``Enum._add_member_`` on Python >= 3.13, else
  the three tables ``_member_map_``, ``_member_names_`` and ``_value2member_map_`` (what ``_add_member_`` fills).
- An import hook (a `sys.meta_path` finder): registration runs right after ``transformers.training_args`` and
  ``transformers.trainer_optimizer`` finish executing, so ``import hf_slim`` does not import transformers'
  training stack (about 1 s) just to register a name.

Callers hand in handlers ``(training_args, optim_args) -> (optimizer_cls_or_factory, kwargs)`` and never see
`OptimizerContext`. Registration is idempotent; a name transformers itself defines keeps transformers' handler.
"""

from __future__ import annotations

import enum
import importlib.abc
import sys
from collections.abc import Callable, Mapping
from typing import Any

from transformers.utils import logging

from .._registration import spec_running_after
from . import TransformersCompatError


__all__ = ["TOUCH_POINTS", "OptimizerHandler", "register_optimizers", "register_optimizers_when_loaded"]

# Under transformers' logger hierarchy (as the SlimMoe family's), so `transformers.logging.set_verbosity_*` governs it.
logger = logging.get_logger(f"transformers.{__name__}")

TOUCH_POINTS: dict[str, str] = {
    "transformers.training_args.OptimizerNames": (
        "TrainingArguments and HfArgumentParser accept only its values, so each name is added as a member"
    ),
    "transformers.trainer_optimizer._OPTIMIZER_HANDLERS": (
        "private name -> handler(ctx) table that Trainer.get_optimizer_cls_and_kwargs dispatches on; no public registry"
    ),
    "transformers.trainer_optimizer.OptimizerContext": (
        "what a handler receives; we read its `args` (TrainingArguments) and `optim_args` (parsed `k=v,...` strings)"
    ),
    "transformers.trainer_optimizer.is_optimizer_factory": (
        "a handler's non-Optimizer result is a factory, called as factory()(model, **kwargs): that hands us the model"
    ),
}
"""Each transformers name this module relies on, and why. tests/test_transformers_touchpoints.py checks each."""

OptimizerHandler = Callable[[Any, dict[str, str]], tuple[Any, dict[str, Any]]]
"""``(training_args, optim_args) -> (optimizer class or factory, kwargs)``; ``optim_args`` as parsed by transformers."""

_TRAINING_ARGS = "transformers.training_args"
_TRAINER_OPTIMIZER = "transformers.trainer_optimizer"
_WATCHED = (_TRAINING_ARGS, _TRAINER_OPTIMIZER)
_INSTEAD = (
    "Pass the optimizer directly instead: Trainer(..., optimizer_cls_and_kwargs=(hf_slim.optim.AuroraFactory, {...}))."
)

_pending: dict[str, OptimizerHandler] = {}  # names registered by `register_optimizers_when_loaded`
_warned: set[str] = set()


def register_optimizers(handlers: Mapping[str, OptimizerHandler]) -> None:
    """Make each key a valid ``optim=`` name dispatched to its handler, now (imports transformers' training modules).

    Args:
        handlers (`Mapping[str, OptimizerHandler]`): optimizer name -> handler.

    Raises:
        `TransformersCompatError`: a touch point in ``TOUCH_POINTS`` is gone or changed shape.
        `ImportError`: transformers is not installed.
    """
    import transformers.trainer_optimizer
    import transformers.training_args

    _add_names(transformers.training_args, handlers)
    _add_handlers(transformers.trainer_optimizer, handlers)


def register_optimizers_when_loaded(handlers: Mapping[str, OptimizerHandler]) -> None:
    """Like `register_optimizers`, without importing transformers: registers with whichever of its training modules
    is already loaded, and with the others right after they load. Never raises (it may run inside transformers'
    own import); a `TransformersCompatError` is logged once as a warning instead, and `register_optimizers` raises it.
    """
    _pending.update(handlers)
    for name in _WATCHED:
        if name in sys.modules:
            _after_load(name)
    if all(name in sys.modules for name in _WATCHED):
        return
    if not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def _after_load(fullname: str) -> None:
    module = sys.modules.get(fullname)
    if module is None or not _pending:
        return
    try:
        if fullname == _TRAINING_ARGS:
            _add_names(module, _pending)
        else:
            # trainer_optimizer imports training_args first, so the enum is complete by now
            _add_names(sys.modules[_TRAINING_ARGS], _pending)
            _add_handlers(module, _pending)
    except TransformersCompatError as err:
        if err.internal not in _warned:
            _warned.add(err.internal)
            logger.warning(f"optim={sorted(_pending)} is not registered: {err}")


def _optimizer_names(training_args: Any) -> type[enum.Enum]:
    names = getattr(training_args, "OptimizerNames", None)
    if not (isinstance(names, type) and issubclass(names, enum.Enum) and issubclass(names, str)):
        raise TransformersCompatError("transformers.training_args.OptimizerNames", "has no str-valued Enum", _INSTEAD)
    return names


def _add_names(training_args: Any, handlers: Mapping[str, OptimizerHandler]) -> None:
    names = _optimizer_names(training_args)
    for value in handlers:
        _add_enum_member(names, value.upper(), value)


def _add_handlers(trainer_optimizer: Any, handlers: Mapping[str, OptimizerHandler]) -> None:
    table = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(table, dict):
        raise TransformersCompatError(
            "transformers.trainer_optimizer._OPTIMIZER_HANDLERS", "has no optimizer handler table (a dict)", _INSTEAD
        )
    names = _optimizer_names(sys.modules[_TRAINING_ARGS])
    for value, handler in handlers.items():
        existing = table.get(value)
        if existing is not None and getattr(existing, "__module__", None) != __name__:
            if value not in _warned:
                _warned.add(value)
                logger.warning(f"transformers already defines optim={value!r}; keeping its implementation")
            continue
        table[names(value)] = _adapt(handler)


def _adapt(handler: OptimizerHandler) -> Callable[[Any], tuple[Any, dict[str, Any]]]:
    def transformers_handler(ctx: Any) -> tuple[Any, dict[str, Any]]:
        try:
            args, optim_args = ctx.args, ctx.optim_args
        except AttributeError:
            raise TransformersCompatError(
                "transformers.trainer_optimizer.OptimizerContext.args / .optim_args",
                "passes optimizer handlers a context without these fields",
                _INSTEAD,
            ) from None
        return handler(args, dict(optim_args))

    transformers_handler.__wrapped__ = handler
    return transformers_handler


def _add_enum_member(enum_cls: Any, name: str, value: str) -> Any:
    # The way `enum` itself adds a member: `_add_member_` on Python >= 3.13, the same three tables before that.
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


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs `_after_load` right after a watched transformers module finishes executing."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _WATCHED:
            return None
        return spec_running_after(self, fullname, path, target, _after_load)
