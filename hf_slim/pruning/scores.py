"""Importance scores and index choices per axis (pure functions of `ImportanceStats` and sizes).

Every chooser returns kept indices in ascending source order, so keeping everything is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .stats import STAT_KEYS_SINCE, ImportanceStats

__all__ = [
    "HIDDEN_METHODS",
    "top_indices",
    "hidden_importance",
    "choose_hidden",
    "choose_layers",
    "choose_heads",
    "choose_neurons",
    "choose_expert_neurons",
]


def top_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` highest-scored indices, ascending; ties go to the lower index (deterministic)."""
    if k > score.numel():
        raise ValueError(f"cannot keep {k} of {score.numel()} units")
    order = torch.argsort(score.float(), descending=True, stable=True)
    return order[:k].sort().values


#: `hidden_method` values, in the order the docs list them.
HIDDEN_METHODS = ("slimqwen", "minitron", "minitron_modelopt")


def hidden_importance(stats: ImportanceStats, method: str = "slimqwen") -> torch.Tensor:
    """Per-channel importance of the hidden (embedding) axis, `[H]`, from the RMSNorm outputs.

    Args:
        stats ([`ImportanceStats`]): calibration statistics of the model.
        method (`str`, defaults to `"slimqwen"`): how activations of the norm outputs become one score per channel:

            - `"slimqwen"` (default): mean |x| over batch and sequence at every norm (the decoder norms and the final
              norm), averaged over the norms (SlimQwen, arXiv 2605.08738).
            - `"minitron"`: per norm, the signed mean of x over the sequence, then the L2 norm over samples, averaged
              over the norms including the final one (the (batch L2, sequence mean) aggregation of the Minitron paper,
              arXiv 2407.14679, applied to LN(X) as written there).
            - `"minitron_modelopt"`: NVIDIA ModelOpt's implementation of Minitron: per norm, mean **|x|** over the
              sequence, then the L2 norm over samples; summed over the decoder layers' two norms only (no final norm,
              no MTP blocks, which ModelOpt drops). Matches `_register_hidden_size_importance` in
              `modelopt/torch/prune/plugins/mcore_minitron.py` (NVIDIA/Model-Optimizer, read at commit a2fbac7b):
              `_collect_activations` keeps `x.abs().mean(dim=0).pow(2).sum(dim=0)` for `x` of shape
              `[seq, batch, hidden]`, summed over forward calls, and `_estimate_hidden_size_importance` sums
              `act.pow(0.5)` over the hooked norms.

    Returns:
        `torch.Tensor` of shape `[H]`; higher is more important.

    Raises:
        `ValueError`: an unknown `method`, or statistics collected before `method`'s statistic existed.
    """
    if method == "slimqwen":
        per_norm, final = stats["hidden.norm_abs_mean"], stats.tensors.get("hidden.final_abs_mean")
    elif method == "minitron":
        per_norm, final = stats["hidden.minitron"], stats.tensors.get("hidden.final_minitron")
    elif method == "minitron_modelopt":
        return _modelopt_hidden_importance(stats)
    else:
        raise ValueError(f"hidden_method={method!r}: valid values are {list(HIDDEN_METHODS)}")
    rows = per_norm.reshape(-1, per_norm.shape[-1])
    if final is not None:
        rows = torch.cat([rows, final[None]], dim=0)
    return rows.mean(0)


def _modelopt_hidden_importance(stats: ImportanceStats) -> torch.Tensor:
    key = "hidden.minitron_modelopt"
    if key not in stats:
        raise ValueError(
            f"hidden_method='minitron_modelopt': these statistics have no {key!r} (it is collected since hf-slim "
            f"{STAT_KEYS_SINCE[key]}); re-run collect_statistics with hf-slim >= {STAT_KEYS_SINCE[key]}"
        )
    sum_sq = stats[key]  # [L, 2, H]: per norm, sum over samples of (mean over sequence of |x|)^2
    # ModelOpt drops MTP heads and hooks only the decoder layers' norms: keep the decoder rows (they come first)
    n_decoder = stats.metadata.get("sizes", {}).get("num_hidden_layers", sum_sq.shape[0])
    return sum_sq[:n_decoder].reshape(-1, sum_sq.shape[-1]).sqrt().sum(0)


def choose_hidden(stats: ImportanceStats, k: int, method: str = "slimqwen") -> torch.Tensor:
    return top_indices(hidden_importance(stats, method), k)


def choose_layers(
    num_layers: int,
    k: int,
    method: str = "last",
    stats: ImportanceStats | None = None,
    layer_types: Sequence[str] | None = None,
) -> torch.Tensor:
    """Decoder layers to keep.

    `last` keeps the first `k` (SlimQwen). `block_influence` keeps the `k` layers whose output differs most from
    their input (Minitron's BI); in hybrid models (several `layer_types`) each type keeps its share so the ratio of
    e.g. full to linear attention is preserved.
    """
    if not 1 <= k <= num_layers:
        raise ValueError(f"num_hidden_layers={k}: must lie in [1, {num_layers}]")
    if method == "last":
        return torch.arange(k)
    if method != "block_influence":
        raise ValueError(f"depth_method={method!r}: valid values are ['last', 'block_influence']")
    if stats is None:
        raise ValueError("stats: depth_method='block_influence' needs calibration statistics")
    bi = stats["layer.block_influence"][:num_layers]  # MTP blocks (if any) come after the decoder layers
    kinds = list(layer_types) if layer_types is not None and len(set(layer_types)) > 1 else None
    if kinds is None:
        return top_indices(bi, k)
    # largest-remainder quotas per layer type
    counts = {t: kinds.count(t) for t in dict.fromkeys(kinds)}
    exact = {t: c * k / num_layers for t, c in counts.items()}
    quota = {t: int(v) for t, v in exact.items()}
    for t in sorted(exact, key=lambda t: exact[t] - quota[t], reverse=True)[: k - sum(quota.values())]:
        quota[t] += 1
    kept: list[int] = []
    for t, q in quota.items():
        idx = torch.tensor([i for i, kind in enumerate(kinds) if kind == t])
        kept += idx[top_indices(bi[idx], q)].tolist()
    return torch.tensor(sorted(kept))


def choose_heads(
    head_score: torch.Tensor, num_kv_heads: int, target_heads: int, target_kv_heads: int
) -> torch.Tensor:
    """Query heads to keep in one layer, KV-group aware.

    KV groups are ranked by the summed importance of their query heads and the best `target_kv_heads` kept; inside
    each kept group the best `target_heads // target_kv_heads` heads are kept. Output is grouped (ascending groups,
    ascending heads), which is what [`hf_slim.anatomy.kv_indices_for_heads`] expects.
    """
    n_heads = head_score.numel()
    group = n_heads // num_kv_heads
    per_group = target_heads // target_kv_heads
    if per_group > group or target_heads % target_kv_heads:
        raise ValueError(
            f"num_attention_heads={target_heads} with num_key_value_heads={target_kv_heads}: needs {per_group} "
            f"heads per group, groups hold {group}"
        )
    scores = head_score.view(num_kv_heads, group)
    groups = top_indices(scores.sum(1), target_kv_heads)
    return torch.cat([g * group + top_indices(scores[g], per_group) for g in groups.tolist()])


def choose_neurons(act: torch.Tensor, k: int) -> torch.Tensor:
    """FFN neurons (dense or shared expert) with the largest mean |activation| at the down-projection input."""
    return top_indices(act, k)


def choose_expert_neurons(act: torch.Tensor, k: int) -> torch.Tensor:
    """Per-expert neuron sets `[E, k]` from `[E, I]` activation magnitudes (experts prune independently)."""
    return torch.stack([top_indices(row, k) for row in act])
