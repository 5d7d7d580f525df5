"""TRL-style trainers of hf-slim.

```python
>>> from trainers import SlimDistillationConfig, SlimDistillationTrainer
>>> args = SlimDistillationConfig(output_dir="out", max_steps=1000, lambda_start=1.0, lambda_end=0.75)
>>> trainer = SlimDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
...                                   processing_class=tokenizer)
>>> trainer.train()
```
"""

from .distillation_config import SlimDistillationConfig
from .distillation_trainer import (
    SlimDistillationTrainer,
    check_dataset_columns,
    elastic_variant_names,
    sample_elastic_variants,
)
from .nonfinite import NonFiniteLossError
from .teacher import teacher_quantization_config


__all__ = [
    "NonFiniteLossError",
    "SlimDistillationConfig",
    "SlimDistillationTrainer",
    "check_dataset_columns",
    "elastic_variant_names",
    "sample_elastic_variants",
    "teacher_quantization_config",
]
