"""Expert-count strategies: drop by frequency / soft / REAP score, merge, and SlimQwen's partial preservation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .scores import top_indices
from .stats import ImportanceStats

__all__ = ["ExpertPlan", "expert_importance", "expert_similarity", "plan_experts", "merge_expert_rows"]

_IMPORTANCE_KEYS = {"frequency": "expert.frequency", "soft": "expert.soft", "reap": "expert.reap"}


@dataclass
class ExpertPlan:
    """Which experts of one layer survive and what merges into them.

    `kept` is ascending; `groups[k]` lists the source experts whose weights average into kept expert `k`
    (itself first); experts only dropped appear nowhere.
    """

    kept: torch.Tensor
    groups: dict[int, list[int]] = field(default_factory=dict)

    @property
    def merges(self) -> bool:
        return any(len(m) > 1 for m in self.groups.values())


def expert_importance(stats: ImportanceStats, layer: int, method: str) -> torch.Tensor:
    """`[E]` scores of one layer: `frequency`, `soft` or `reap` (see [`STAT_KEYS`])."""
    if method not in _IMPORTANCE_KEYS:
        raise ValueError(f"expert importance {method!r}: valid values are {list(_IMPORTANCE_KEYS)}")
    return stats[_IMPORTANCE_KEYS[method]][layer]


def expert_similarity(
    stats: ImportanceStats | None, layer: int, method: str, router_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """`[E, E]` cosine similarity between experts of one layer.

    `router_logits`: over the calibration tokens' router logits (from the accumulated Gram matrix);
    `router_weight`: between router rows; `expert_output`: between mean expert outputs.
    """
    if method == "router_logits":
        gram = stats["expert.router_gram"][layer].double()
        d = gram.diagonal().clamp_min(1e-30).sqrt()
        return (gram / d[:, None] / d[None, :]).float()
    if method == "router_weight":
        if router_weight is None:
            raise ValueError("merge_similarity='router_weight' needs the router weight")
        w = F.normalize(router_weight.detach().float(), dim=-1)
        return w @ w.T
    if method == "expert_output":
        v = F.normalize(stats["expert.mean_output"][layer].float(), dim=-1)
        return v @ v.T
    raise ValueError(
        f"merge_similarity={method!r}: valid values are ['router_logits', 'router_weight', 'expert_output']"
    )


def plan_experts(
    importance: torch.Tensor, n_keep: int, strategy: str, similarity: torch.Tensor | None = None
) -> ExpertPlan:
    """Choose the surviving experts of one layer.

    - `frequency` / `soft` / `reap`: keep the `n_keep` highest `importance` (the score matching the strategy).
    - `merge`: keep the same set; every dropped expert merges into its most similar kept expert.
    - `partial_preserve` (SlimQwen Algorithm 1): the top `floor(n_keep / 2)` experts are kept intact; the next
      `n_keep - floor(n_keep / 2)` by importance form the base set; every other expert merges into its most similar
      base expert. Merges are importance-weighted (see [`merge_expert_rows`]).
    """
    n = importance.numel()
    if not 1 <= n_keep <= n:
        raise ValueError(f"num_experts={n_keep}: must lie in [1, {n}]")
    if strategy in ("frequency", "soft", "reap"):
        return ExpertPlan(kept=top_indices(importance, n_keep))
    if similarity is None:
        raise ValueError(f"expert_strategy={strategy!r} needs an expert similarity matrix")
    order = torch.argsort(importance.float(), descending=True, stable=True)
    if strategy == "merge":
        targets = order[:n_keep]
    elif strategy == "partial_preserve":
        targets = order[n_keep // 2 : n_keep]
    else:
        raise ValueError(
            f"expert_strategy={strategy!r}: valid values are ['frequency', 'soft', 'reap', 'merge', 'partial_preserve']"
        )
    kept = order[:n_keep].sort().values
    groups = {int(k): [int(k)] for k in kept}
    rest = order[n_keep:]
    if rest.numel():
        nearest = targets[similarity[rest][:, targets].argmax(dim=1)]
        for src, dst in zip(rest.tolist(), nearest.tolist(), strict=True):
            groups[dst].append(src)
    return ExpertPlan(kept=kept, groups=groups)


def merge_expert_rows(weight: torch.Tensor, plan: ExpertPlan, importance: torch.Tensor) -> torch.Tensor:
    """Importance-weighted average of expert rows (dim 0) per merge group; other rows are returned untouched.

    For a group G merging into kept expert m: `W~_m = sum_{g in G} I_g W_g / sum_{g in G} I_g` (SlimQwen's
    pairwise formula generalised to groups); a group whose importances are all zero averages uniformly.
    """
    out = weight.clone()
    for dst, members in plan.groups.items():
        if len(members) < 2:
            continue
        imp = importance[members].double().clamp_min(0)
        w = imp / imp.sum() if imp.sum() > 0 else torch.full_like(imp, 1.0 / len(members))
        stacked = weight[members].double()
        out[dst] = (w.view(-1, *([1] * (stacked.ndim - 1))) * stacked).sum(0).to(weight.dtype)
    return out
