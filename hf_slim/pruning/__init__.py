"""SlimQwen-style structured pruning: calibration statistics, importance scores, expert strategies, `prune`.

```python
>>> from hf_slim.pruning import collect_statistics, PruneConfig, prune
>>> stats = collect_statistics(model, texts, tokenizer=tok, num_samples=1024, max_length=2048)
>>> small = prune(model, PruneConfig(num_hidden_layers=0.75, hidden_size=1536, num_experts=256), stats)
```
"""

from .budget import BudgetSearch, calibration_loss, count_parameters_for, resolve_budget, search_budget
from .calibration import collect_statistics, pack_calibration_data
from .config import SIZE_FIELDS, PruneConfig
from .experts import expert_importance
from .export import save_pruned, size_summary
from .layerwise import LayerwiseCalibrationError, collect_statistics_layerwise
from .progressive import ProgressivePlan, prune_progressively
from .prune import plan_selection, prune
from .scores import choose_layers, hidden_importance
from .streaming import prune_checkpoint
from .stats import ImportanceStats

__all__ = [
    "BudgetSearch",
    "calibration_loss",
    "count_parameters_for",
    "resolve_budget",
    "search_budget",
    "choose_layers",
    "collect_statistics",
    "LayerwiseCalibrationError",
    "collect_statistics_layerwise",
    "expert_importance",
    "hidden_importance",
    "pack_calibration_data",
    "ImportanceStats",
    "PruneConfig",
    "ProgressivePlan",
    "SIZE_FIELDS",
    "prune",
    "prune_checkpoint",
    "prune_progressively",
    "plan_selection",
    "save_pruned",
    "size_summary",
]
