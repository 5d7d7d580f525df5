"""Architecture anatomy: one declarative axes spec per model family and the generic `select`.

```python
>>> from hf_slim.anatomy import get_spec, select
>>> spec = get_spec(model)              # by config.model_type
>>> smaller = select(model, "expert", {i: keep[i] for i in range(model.config.num_hidden_layers)})
```
"""

from __future__ import annotations

from .blocks import expert_ffn_activations, layers_with
from .core import (
    ArchSpec,
    Dim,
    Selection,
    TensorRule,
    apply_selection,
    check_coverage,
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
from .layout import IDENTITY_LAYOUT, ExpertStack, StoredLayout
from .registry import get_spec, register_family, supported_model_types
from .vocabulary import (
    AXES,
    AXIS_SIZE_FIELDS,
    NESTED_SIZE_FIELDS,
    PER_LAYER_AXES,
    PER_LAYER_SIZE_FIELD_OF_AXIS,
    SELECTABLE_AXES,
    SIZE_FIELD_OF_AXIS,
    SIZE_FIELDS,
    SIZES,
    SizeField,
)

__all__ = [
    "AXES",
    "AXIS_SIZE_FIELDS",
    "NESTED_SIZE_FIELDS",
    "PER_LAYER_AXES",
    "PER_LAYER_SIZE_FIELD_OF_AXIS",
    "SELECTABLE_AXES",
    "SIZE_FIELDS",
    "SIZE_FIELD_OF_AXIS",
    "SIZES",
    "SizeField",
    "ArchSpec",
    "Dim",
    "ExpertStack",
    "IDENTITY_LAYOUT",
    "StoredLayout",
    "Selection",
    "TensorRule",
    "apply_selection",
    "check_coverage",
    "contiguous_runs",
    "expert_ffn_activations",
    "get_spec",
    "index_tensor",
    "kv_indices_for_heads",
    "layer_key",
    "layers_with",
    "normalize_selection",
    "prefix_selection",
    "read_indexed",
    "register_family",
    "renamed",
    "select",
    "select_config",
    "select_tensors",
    "supported_model_types",
    "tensor_index",
]
