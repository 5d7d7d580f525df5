"""The one family registry: `model_type` -> the module holding its axes spec (`SPEC`).

Everything that depends on the family (pruning, calibration, elastic slicing, conversion to and from SlimMoe) looks
the family up here, so adding a family is one spec file (registered below, or with [`register_family`]) plus a parity
test. Spec modules are imported on first use so `import hf_slim` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: core imports this module
    from .core import ArchSpec

__all__ = ["get_spec", "register_family", "supported_model_types"]

_FAMILIES: dict[str, str] = {
    model_type: f"{__package__}.{model_type}"
    for model_type in (
        "qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "qwen3_next", "slim_moe", "glm4_moe", "deepseek_v3",
    )  # fmt: skip
}


def register_family(model_type: str, module: str, *, replace: bool = False) -> None:
    """Register the axes spec of a family.

    Args:
        model_type (`str`): the `config.model_type` it describes.
        module (`str`): importable module path holding `SPEC` (an [`ArchSpec`] of that `model_type`).
        replace (`bool`, defaults to `False`): allow replacing an already registered family.

    Raises:
        `ValueError`: `model_type` is registered already (and `replace` is not set).
    """
    if model_type in _FAMILIES and not replace and _FAMILIES[model_type] != module:
        raise ValueError(
            f"model_type={model_type!r} already has an axes spec in {_FAMILIES[model_type]}; pass replace=True to "
            "override it"
        )
    _FAMILIES[model_type] = module


def supported_model_types() -> list[str]:
    """The `model_type`s with an axes spec."""
    return sorted(_FAMILIES)


def get_spec(obj: Any) -> ArchSpec:
    """The axes spec for a model, a config or a `model_type` string.

    Raises:
        `ValueError`: for a model type without a spec, listing the supported ones.
    """
    model_type = obj if isinstance(obj, str) else getattr(getattr(obj, "config", obj), "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"model_type={model_type!r} has no axes spec; supported model types: {', '.join(supported_model_types())}"
        )
    spec = importlib.import_module(_FAMILIES[model_type]).SPEC
    if spec.model_type != model_type:
        raise ValueError(f"{_FAMILIES[model_type]}.SPEC describes {spec.model_type!r}, not {model_type!r}")
    return spec
