"""What `import hf_slim` registers with transformers, and when, without importing transformers itself.

`import hf_slim` always registered SlimMoe with `AutoConfig` / `AutoModel` / `AutoModelForCausalLM` (`hf_slim.models`)
and ``optim="aurora"`` / ``"aurora_lora"`` with `TrainingArguments` and `Trainer` (`hf_slim.optim`). Both need torch
and transformers, whose import takes seconds, so `import hf_slim` (and `hf-slim --help`, whose console script
imports the package first) no longer imports them; instead:

- if transformers is already imported, `import hf_slim` registers at once;
- else an import hook (a `sys.meta_path` finder, as `hf_slim.integrations.transformers_optim` uses for the training
  modules) registers right after transformers loads; the first transformers module that finishes loading while no
  hf_slim or transformers module is half-imported triggers it, then the hook removes itself;
- `hf_slim.register_with_transformers()` registers now (the `hf-slim` command calls it before a sub-command runs).

Registration imports `hf_slim.models` and `hf_slim.optim`, which register on import (idempotent).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

__all__ = ["register_if_loaded", "register_when_transformers_loads", "register_with_transformers"]

_registered = False
_registering = False  # the imports of `register_with_transformers` load transformers modules: not a trigger
_failed = False  # the automatic registration failed once (warned); `register_with_transformers()` still tries


def register_with_transformers() -> None:
    """Register SlimMoe with the transformers Auto classes and Aurora with `TrainingArguments(optim=...)` now.

    Idempotent; imports transformers and torch. `import hf_slim` arranges the same as soon as transformers is loaded,
    so calling this is only needed to have it done at a known point (or to see the error where it fails).
    """
    global _registered, _registering
    import importlib

    _registering = True
    try:
        importlib.import_module("hf_slim.models").register_auto_classes()
        importlib.import_module("hf_slim.optim")  # registers the optim names now or when the training modules load
    finally:
        _registering = False
    _registered = True
    _remove_hook()


def _initializing(module: Any) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _safe(loading: str | None = None) -> bool:
    """No hf_slim or transformers module (besides `loading`, which just finished executing) is half-imported.

    Registering from inside such an import would see a half-made module (an `hf_slim.models` that imports
    transformers has not defined `register_auto_classes` yet); those imports register themselves when they finish.
    """
    return not any(
        name != loading and name.partition(".")[0] in ("hf_slim", "transformers") and _initializing(module)
        for name, module in list(sys.modules.items())
    )


def register_if_loaded(loading: str | None = None) -> None:
    """Register now if transformers is loaded and no import that registration depends on is half-done."""
    global _failed
    if _registered or _registering or _failed or "transformers" not in sys.modules or not _safe(loading):
        return
    try:
        register_with_transformers()
    except Exception as error:  # may run inside the user's `import transformers`: never make that import fail
        _failed = True  # once: not again at every transformers module that loads
        _remove_hook()
        warnings.warn(
            f"hf_slim could not register SlimMoe / optim='aurora' with transformers ({type(error).__name__}: "
            f"{error}); call hf_slim.register_with_transformers() to see the traceback.",
            stacklevel=2,
        )


class _RegisterAfterTransformers:
    """A `sys.meta_path` finder: after each transformers module executes, `register_if_loaded` (once it has, the
    finder removes itself)."""

    def __init__(self) -> None:
        self._busy: set[str] = set()  # names this finder is resolving (another hook may call back into it)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if _registered or _registering or fullname in self._busy or fullname.partition(".")[0] != "transformers":
            return None
        self._busy.add(fullname)
        try:
            return spec_running_after(self, fullname, path, target, lambda name: register_if_loaded(loading=name))
        finally:
            self._busy.discard(fullname)


def spec_running_after(finder: Any, fullname: str, path: Any, target: Any, after: Any) -> Any:
    """The spec the other `sys.meta_path` finders give `fullname`, its loader made to call `after(fullname)` once the
    module has executed: how a finder acts right after an import (here and in `integrations.transformers_optim`)."""
    for other in sys.meta_path:
        if other is finder or not hasattr(other, "find_spec"):
            continue
        spec = other.find_spec(fullname, path, target)
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
        after(fullname)

    loader.exec_module = exec_module
    return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterAfterTransformers)]


def register_when_transformers_loads() -> None:
    """What `import hf_slim` runs: register now if transformers is loaded, else right after it loads."""
    register_if_loaded(loading="hf_slim")  # called last in hf_slim/__init__.py: the package itself is done
    if not _registered and not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())
