"""Elastic many-in-one checkpoints: nested variants, zero-copy switching, slicing, partial loading and
budget-controlled generation.

```python
>>> from hf_slim.elastic import ElasticBudget, ElasticConfig, make_elastic, slice_variant
>>> elastic = make_elastic(model, ElasticConfig(variants={"small": {"hidden_size": 512, "num_experts": 32}}), stats)
>>> logits = elastic(input_ids, elastic_variant="small").logits        # prefix views, no copies
>>> small = slice_variant(elastic, "small")                             # standalone SlimMoeForCausalLM
>>> small = AutoModelForCausalLM.from_pretrained(folder, elastic_variant="small")  # reads only its slices
>>> out = elastic.generate(ids, elastic_budget=ElasticBudget("small", end_think_token_id=think_end), max_new_tokens=64)
```
"""

from ..models.slim_moe.modeling_slim_moe import ElasticBudget, ElasticGenerateOutput, load_elastic_variant
from .config import ELASTIC_FIELDS, FULL_VARIANT, ElasticConfig
from .nesting import LAYER_METHODS, importance_orders, make_elastic, slice_variant, variant_selection

__all__ = [
    "ELASTIC_FIELDS",
    "FULL_VARIANT",
    "LAYER_METHODS",
    "ElasticBudget",
    "ElasticConfig",
    "ElasticGenerateOutput",
    "importance_orders",
    "load_elastic_variant",
    "make_elastic",
    "slice_variant",
    "variant_selection",
]
