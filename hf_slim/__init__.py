"""hf-slim: prune, distill and nest Mixture-of-Experts language models in the Hugging Face ecosystem.

`import hf_slim` registers the SlimMoe family with the transformers Auto classes and the Aurora optimizer with
`TrainingArguments(optim="aurora" | "aurora_lora")`: at once if transformers is already imported, else right after
it is (see `hf_slim._registration`); `hf_slim.register_with_transformers()` does it now.

The package itself imports neither torch nor transformers (so `hf-slim --help` is quick): the public names below and
the subpackages load on first use (PEP 562), `from hf_slim import prune` as before.
"""

import importlib as _importlib
import importlib.util as _importlib_util
from typing import TYPE_CHECKING

from . import _registration
from ._registration import register_with_transformers


if TYPE_CHECKING:
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

# public name -> the module it lives in (loaded on first access)
_EXPORTS = {
    "Aurora": "optim",
    "ElasticBudget": "elastic",
    "ElasticConfig": "elastic",
    "ImportanceStats": "pruning",
    "ProgressivePlan": "pruning",
    "PruneConfig": "pruning",
    "SlimMoeConfig": "models",
    "SlimMoeForCausalLM": "models",
    "SlimMoeModel": "models",
    "collect_statistics": "pruning",
    "convert_checkpoint": "convert_streaming",
    "make_elastic": "elastic",
    "make_elastic_checkpoint": "elastic",
    "prune": "pruning",
    "prune_checkpoint": "pruning",
    "slice_checkpoint": "elastic",
    "slice_variant": "elastic",
}

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
    "register_with_transformers",
    "slice_checkpoint",
    "slice_variant",
]


def __getattr__(name: str) -> object:
    """`hf_slim.<public name>` or `hf_slim.<subpackage>`, imported on first use."""
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif not name.startswith("__") and _importlib_util.find_spec(f"{__name__}.{name}") is not None:
        value = _importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    _registration.register_if_loaded()  # that import may have loaded transformers from inside hf_slim
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {name for name in globals() if not name.startswith("_")})


_registration.register_when_transformers_loads()
