"""Elastic many-in-one checkpoints: nested variants, zero-copy switching, slicing, partial loading and
budget-controlled generation.

```python
>>> from hf_slim.elastic import ElasticBudget, ElasticConfig, make_elastic, slice_variant
>>> elastic = make_elastic(model, ElasticConfig(variants={"small": {"hidden_size": 512, "num_experts": 32}}), stats)
>>> logits = elastic(input_ids, elastic_variant="small").logits        # prefix views, no copies
>>> small = slice_variant(elastic, "small")                             # standalone SlimMoeForCausalLM
>>> small = AutoModelForCausalLM.from_pretrained(folder, elastic_variant="small")  # reads only its slices
>>> make_elastic_checkpoint("my-moe", "my-elastic-moe", variants, stats)          # on disk, tensor by tensor
>>> slice_checkpoint("my-elastic-moe", "small", "my-moe-small")                   # on disk, tensor by tensor
>>> out = elastic.generate(ids, elastic_budget=ElasticBudget("small", end_think_token_id=think_end), max_new_tokens=64)
```
"""

from ..models.slim_moe.modeling_slim_moe import ElasticBudget, ElasticGenerateOutput, load_elastic_variant
from .config import ELASTIC_FIELDS, FULL_VARIANT, ElasticConfig
from .nesting import LAYER_METHODS, elastic_plan, importance_orders, make_elastic, slice_variant, variant_selection
from .streaming import make_elastic_checkpoint, slice_checkpoint

__all__ = [
    "ELASTIC_FIELDS",
    "FULL_VARIANT",
    "LAYER_METHODS",
    "ElasticBudget",
    "ElasticConfig",
    "ElasticGenerateOutput",
    "elastic_plan",
    "importance_orders",
    "load_elastic_variant",
    "make_elastic",
    "make_elastic_checkpoint",
    "slice_checkpoint",
    "slice_variant",
    "variant_selection",
]
