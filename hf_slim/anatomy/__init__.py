"""Architecture anatomy: one declarative axes spec per model family and the generic `select`.

```python
>>> from hf_slim.anatomy import get_spec, select
>>> spec = get_spec(model)              # by config.model_type
>>> smaller = select(model, "expert", {i: keep[i] for i in range(model.config.num_hidden_layers)})
```
"""

from __future__ import annotations

import importlib
from typing import Any

from .core import (
    AXES,
    PER_LAYER_AXES,
    ArchSpec,
    Dim,
    Selection,
    TensorRule,
    apply_selection,
    contiguous_runs,
    index_tensor,
    kv_indices_for_heads,
    layer_key,
    normalize_selection,
    prefix_selection,
    read_indexed,
    renamed,
    select,
    select_config,
    select_tensors,
    tensor_index,
)

__all__ = [
    "AXES",
    "PER_LAYER_AXES",
    "ArchSpec",
    "Dim",
    "Selection",
    "TensorRule",
    "apply_selection",
    "contiguous_runs",
    "get_spec",
    "index_tensor",
    "kv_indices_for_heads",
    "layer_key",
    "normalize_selection",
    "prefix_selection",
    "read_indexed",
    "renamed",
    "select",
    "select_config",
    "select_tensors",
    "supported_model_types",
    "tensor_index",
]

# model_type -> module holding `SPEC`; imported on first use so `import hf_slim` stays light
_FAMILIES = {
    "qwen3_moe": "qwen3_moe",
    "qwen2_moe": "qwen2_moe",
    "olmoe": "olmoe",
    "mixtral": "mixtral",
    "qwen3_next": "qwen3_next",
    "slim_moe": "slim_moe",
}


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
    module = importlib.import_module(f"{__name__}.{_FAMILIES[model_type]}")
    return module.SPEC
