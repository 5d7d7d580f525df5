"""hf-slim: prune, distill and nest Mixture-of-Experts language models in the Hugging Face ecosystem.

`import hf_slim` registers the SlimMoe family with the transformers Auto classes and the Aurora optimizer with
`TrainingArguments(optim="aurora" | "aurora_lora")`.
"""

from . import optim
from .convert_streaming import convert_checkpoint
from .elastic import (
    ElasticBudget,
    ElasticConfig,
    make_elastic,
    make_elastic_checkpoint,
    slice_checkpoint,
    slice_variant,
)
from .models import SlimMoeConfig, SlimMoeForCausalLM, SlimMoeModel
from .optim import Aurora
from .pruning import ImportanceStats, ProgressivePlan, PruneConfig, collect_statistics, prune, prune_checkpoint


__version__ = "0.1.0"

__all__ = [
    "Aurora",
    "ElasticBudget",
    "ElasticConfig",
    "ImportanceStats",
    "ProgressivePlan",
    "PruneConfig",
    "SlimMoeConfig",
    "SlimMoeForCausalLM",
    "SlimMoeModel",
    "__version__",
    "collect_statistics",
    "convert_checkpoint",
    "make_elastic",
    "make_elastic_checkpoint",
    "optim",
    "prune",
    "prune_checkpoint",
    "slice_checkpoint",
    "slice_variant",
]
