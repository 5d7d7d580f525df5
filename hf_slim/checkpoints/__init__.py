"""Checkpoints on disk, in the model's naming: a lazy reader, a sharded writer, and the family's stored layout.

```python
>>> from hf_slim.checkpoints import ShardedCheckpointWriter, open_checkpoint
>>> with open_checkpoint("Qwen/Qwen3-30B-A3B") as ckpt:  # a folder or a Hub id
...     router = ckpt.read("model.layers.0.mlp.gate.weight")
...     experts = ckpt.read("model.layers.0.mlp.experts.gate_up_proj", [[(0, 8)], None, None])  # 8 experts read
```

The mapping between the model's tensors (fused experts) and what `save_pretrained` stores (one tensor per expert,
renamed modules) is declared per family in its anatomy spec (`ArchSpec.stored_layout`); see docs/checkpoints.md.
"""

from .reader import (
    HUB_PATTERNS,
    CheckpointError,
    CheckpointReader,
    StateDictReader,
    open_checkpoint,
)
from .writer import ShardedCheckpointWriter

__all__ = [
    "HUB_PATTERNS",
    "CheckpointError",
    "CheckpointReader",
    "ShardedCheckpointWriter",
    "StateDictReader",
    "open_checkpoint",
]
