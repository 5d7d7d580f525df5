"""Pruning to a parameter budget: the sizes that give a model of at most N total (or active) parameters.

Users state a budget ("20B total", "3B active"); [`resolve_budget`] turns it into sizes along the axes it may change,
by one documented, deterministic rule, counting parameters exactly: every candidate configuration is built on the
meta device (`AutoModelForCausalLM.from_config` under `torch.device("meta")`, no memory, no weights) and counted by
[`hf_slim.utils.count_parameters`], so every family works without a parameter formula of its own.

```python
>>> from hf_slim.pruning import resolve_budget
>>> resolve_budget(qwen3_30b_a3b_config, target_total_params="20B")
{'num_hidden_layers': 46, 'hidden_size': 1856, 'moe_intermediate_size': 640, 'num_experts': 112}
```
"""

from __future__ import annotations

import bisect
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..anatomy import get_spec, normalize_selection, prefix_selection, select_config
from ..anatomy.vocabulary import SIZE_FIELDS
from ..utils import count_parameters
from .scores import choose_layers
from .stats import ImportanceStats

__all__ = [
    "BUDGET_AXES",
    "DEFAULT_BUDGET_AXES",
    "BudgetCandidate",
    "BudgetSearch",
    "calibration_loss",
    "count_parameters_for",
    "format_param_count",
    "parse_param_count",
    "resolve_budget",
    "search_budget",
]

logger = logging.getLogger(__name__)

#: Every size field a budget may choose (canonical names, as `PruneConfig` spells them).
BUDGET_AXES = SIZE_FIELDS
#: What a budget chooses when `axes` is not given, in top-up order; minus the fixed sizes and the axes a model lacks
#: (no dense FFN layer, no shared expert), and minus `num_experts` when only an active budget is given (experts do
#: not change what runs per token). Heads, KV heads and top-k are chosen only when named.
DEFAULT_BUDGET_AXES = (
    "num_hidden_layers",
    "hidden_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "intermediate_size",
    "num_experts",
)
_EXPERT_STEP = 8  # NVIDIA ModelOpt's `num_moe_experts_divisor` default
_MIN_STEPS = 8  # a step shrinks (halves) until an axis has at least this many steps (tiny test models) ...
_MIN_WIDTH_STEP = 8  # ... but widths stay multiples of 8 (16 bytes in bf16: what grouped GEMM kernels need)
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_COUNT_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?([kmbgt]?)$")


# ---- parameter counts as users write them ----------------------------------------------------------------------
def parse_param_count(value: Any, source: int | None = None, *, name: str = "target_total_params") -> int | float:
    """A parameter count as users write it: an int, a string like `"20B"`, `"3.5B"`, `"800M"`, `"1.2e9"`, or a
    float in (0, 1] (a fraction of the source model's count; a string with a decimal point and no suffix too).

    Args:
        value: the count.
        source (`int`, *optional*): the source model's count, to turn a fraction into an int.
        name (`str`): the field named in error messages.

    Returns:
        The count as an `int`; a fraction stays a `float` when `source` is not given.

    Raises:
        `ValueError`: anything else, in one sentence naming `name` and the value.
    """
    fraction: float | None = None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}={value!r}: give an int, a string like '20B' or '3.5B', or a fraction in (0, 1]")
    if isinstance(value, int):
        count = value
    elif isinstance(value, float):
        if math.isnan(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"{name}={value!r}: a float must be a fraction of the source in (0, 1]; give an int or a "
                             "string like '20B' for an absolute count")
        fraction = value
    else:
        text = "".join(value.split()).lower().replace("_", "").replace(",", "")
        m = _COUNT_RE.match(text)
        if m is None:
            raise ValueError(
                f"{name}={value!r}: not a parameter count; write e.g. '20B', '3.5B', '800M' or 20000000000"
            )
        number = float(m.group(1)) * 10 ** int(m.group(2) or 0)
        if m.group(3) == "" and m.group(2) is None and "." in m.group(1):
            if not 0.0 < number <= 1.0:
                raise ValueError(f"{name}={value!r}: a number with a decimal point is a fraction of the source and "
                                 "must lie in (0, 1]; add a suffix ('3.5B') for an absolute count")
            fraction = number
        count = round(number * _SUFFIX[m.group(3)])
    if fraction is not None:
        return fraction if source is None else max(1, round(fraction * source))
    if count < 1:
        raise ValueError(f"{name}={value!r}: a parameter count must be >= 1")
    return count


def format_param_count(n: int) -> str:
    """`30532122624` -> `"30.53B"` (T, B, M, K with two decimals; plain below a thousand)."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


# ---- the rounding ladder of one axis ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Ladder:
    """The sizes one axis may take, ascending; the last is the largest the fixed sizes allow (usually the source)."""

    axis: str
    values: tuple[int, ...]

    @property
    def top(self) -> int:
        return self.values[-1]

    def at(self, ratio: float) -> int:
        """The largest allowed size <= `ratio * top` (the smallest one below that)."""
        i = bisect.bisect_right(self.values, ratio * self.top * (1 + 1e-9)) - 1
        return self.values[max(i, 0)]

    def above(self, value: int) -> int | None:
        i = bisect.bisect_right(self.values, value)
        return self.values[i] if i < len(self.values) else None


def _step(size: int, preferred: int, smallest: int = 1) -> int:
    step = preferred
    while step // 2 >= smallest and size // step < _MIN_STEPS:
        step //= 2
    return max(step, 1)


def _multiples(top: int, step: int, minimum: int = 1) -> tuple[int, ...]:
    return tuple(sorted({v for v in range(step, top, step) if v >= minimum} | {top}))


# ---- the planner: counts, ladders, the rule ---------------------------------------------------------------------
class _Planner:
    def __init__(
        self,
        config: Any,
        *,
        fixed: Mapping[str, int],
        axes: Sequence[str] | None,
        has_total: bool,
        has_active: bool,
        depth_method: str,
        stats: ImportanceStats | None,
        multiple_of: int,
    ):
        self.config, self.spec = config, get_spec(config)
        self.depth_method, self.stats, self.multiple_of = depth_method, stats, multiple_of
        self.cache: dict[tuple, tuple[int, int]] = {}
        self.source = {n: self._source_size(n) for n in SIZE_FIELDS}
        # block names beyond the decoder layers (MTP layers) come from the source model's parameter names
        source_model = self._meta_model(config)
        self.tensor_names = [n for n, _ in source_model.named_parameters()]
        counts = count_parameters(source_model)
        self.cache[()] = (counts["total"], counts["active"])
        self.fixed = self._check_fixed(fixed)
        heads, kv = self.source["num_attention_heads"], self.source["num_key_value_heads"]
        self.group = heads // kv if heads and kv else 1
        self.head_dim = self.spec.units(config).get("head_dim")
        self.axes = self._choose_axes(axes, has_total, has_active)
        self.ladders: dict[str, _Ladder] = {}
        for a in self.axes:
            self.ladders[a] = self._ladder(a)
        self._drop_inert(explicit=axes is not None)

    # -- sources and checks --
    def _source_size(self, name: str) -> int | None:
        value = getattr(self.config, self.spec.field(name), None)
        if name == "intermediate_size" and "ffn" not in self.spec.axes():
            return None  # Mixtral / OLMoE: `intermediate_size` is the expert width, not a dense FFN
        if name == "moe_intermediate_size" and "expert_ffn" not in self.spec.axes():
            return None
        if name == "shared_expert_intermediate_size" and not value:
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def _check_fixed(self, fixed: Mapping[str, int]) -> dict[str, int]:
        out = {}
        for name, value in fixed.items():
            if name not in SIZE_FIELDS:
                raise ValueError(f"fixed: {name!r} is not a size field; valid fields: {list(SIZE_FIELDS)}")
            source = self.source[name]
            if source is None:
                raise ValueError(f"fixed: {name}={value!r}: this {self.config.model_type} config has no such size")
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= source:
                raise ValueError(f"fixed: {name}={value!r}: must be an int in [1, {source}]")
            out[name] = value
        return out

    def _choose_axes(self, axes: Sequence[str] | None, has_total: bool, has_active: bool) -> list[str]:
        explicit = axes is not None
        if axes is None:
            axes = [a for a in DEFAULT_BUDGET_AXES if not (a == "num_experts" and not has_total)]
        chosen: list[str] = []
        for a in axes:
            if a not in BUDGET_AXES:
                raise ValueError(f"budget_axes: {a!r} is not a size field; valid axes: {list(BUDGET_AXES)}")
            if a in self.fixed:
                if explicit:
                    raise ValueError(f"budget_axes: {a} is also fixed to {self.fixed[a]}; remove it from one of them")
                continue
            if self.source[a] is None:
                if explicit:
                    raise ValueError(f"budget_axes: {a}: this {self.config.model_type} config has no such size")
                continue
            if a not in chosen:
                chosen.append(a)
        self.derived: set[str] = set()
        self.coupled = "hidden_size" in chosen and self._hidden_needs_whole_heads()
        if self.coupled:  # hidden_size = num_attention_heads * head_dim (OLMoE): heads follow hidden
            for a in ("num_attention_heads", "num_key_value_heads"):
                if a in self.fixed:
                    raise ValueError(
                        f"budget_axes: hidden_size of {self.config.model_type} must equal num_attention_heads * "
                        f"head_dim, so the budget chooses the heads with it; {a}={self.fixed[a]} cannot stay fixed"
                    )
            self.derived |= {"num_attention_heads", "num_key_value_heads"}
        elif "num_key_value_heads" in chosen:  # whole KV groups go; the query heads follow
            if "num_attention_heads" in self.fixed:
                raise ValueError(
                    f"budget_axes: num_key_value_heads drops whole KV groups, so num_attention_heads="
                    f"{self.fixed['num_attention_heads']} cannot stay fixed; unfix it or leave the KV heads out"
                )
            self.derived.add("num_attention_heads")
        return [a for a in chosen if a not in self.derived]

    def _drop_inert(self, explicit: bool) -> None:
        """Named axes must change the count; a default axis that does not (a dense width without dense layers) goes."""
        base = self.count(self.sizes({}))
        for a in list(self.ladders):
            if self.count(self.sizes({a: self.ladders[a].values[0]})) != base:
                continue
            if explicit:
                raise ValueError(
                    f"budget_axes: {a} does not change the parameter count of this {self.config.model_type} model "
                    f"(no layer uses it); leave it out"
                )
            del self.ladders[a]
        self.axes = list(self.ladders)

    def _hidden_needs_whole_heads(self) -> bool:
        """Whether the family refuses a hidden size that is not `num_attention_heads * head_dim` (OLMoE sizes its
        q_norm by hidden_size), found by asking the family's own `validate` about a smaller hidden size."""
        hidden, hd = self.source["hidden_size"], self.head_dim
        if not hd or hidden <= hd or hidden != self.source["num_attention_heads"] * hd:
            return False
        try:
            self._config_for({"hidden_size": hidden - hd})
        except ValueError:
            return True
        return False

    def _topk(self, sizes: Mapping[str, int]) -> int:
        return sizes.get("num_experts_per_tok", self.source["num_experts_per_tok"] or 1)

    def _ladder(self, axis: str) -> _Ladder:
        fixed, src = self.fixed, self.source
        if axis == "num_hidden_layers" or axis == "num_experts_per_tok":
            top = src[axis] if axis == "num_hidden_layers" else min(src[axis], fixed.get("num_experts", src[axis]))
            return _Ladder(axis, tuple(range(1, top + 1)))
        if axis == "num_attention_heads":  # heads per KV group, every KV head kept
            kv = fixed.get("num_key_value_heads", src["num_key_value_heads"])
            return _Ladder(axis, tuple(kv * g for g in range(1, self.group + 1)))
        if axis == "num_key_value_heads":
            return _Ladder(axis, tuple(range(1, src[axis] + 1)))
        if axis == "hidden_size" and self.coupled:  # whole KV groups of heads
            unit = self.head_dim * self.group
            return _Ladder(axis, tuple(unit * k for k in range(1, src["num_key_value_heads"] + 1)))
        if axis == "num_experts":
            topk = 1 if "num_experts_per_tok" in self.axes else self._topk(fixed)
            return _Ladder(axis, _multiples(src[axis], _step(src[axis], _EXPERT_STEP), topk))
        step = _step(src[axis], self.multiple_of, min(self.multiple_of, _MIN_WIDTH_STEP))
        return _Ladder(axis, _multiples(src[axis], step))

    # -- sizes, configs, counts --
    def sizes(self, choice: Mapping[str, int]) -> dict[str, int]:
        """The fixed sizes, the choice, and what follows from it (heads from KV groups or hidden; experts >= top-k)."""
        out = {**self.fixed, **choice}
        if self.coupled and "hidden_size" in choice:
            heads = choice["hidden_size"] // self.head_dim
            out["num_attention_heads"], out["num_key_value_heads"] = heads, heads // self.group
        elif "num_key_value_heads" in choice:
            out["num_attention_heads"] = choice["num_key_value_heads"] * self.group
        if "num_experts" in choice and out["num_experts"] < self._topk(out):
            ladder = self.ladders["num_experts"]
            out["num_experts"] = ladder.values[bisect.bisect_left(ladder.values, self._topk(out))]
        return {k: out[k] for k in SIZE_FIELDS if k in out}

    def _config_for(self, sizes: Mapping[str, int]) -> Any:
        changed = {k: v for k, v in sizes.items() if v != self.source[k]}
        axis_sizes = {k: v for k, v in changed.items() if k != "num_experts_per_tok"}
        sel = prefix_selection(self.spec, self.config, axis_sizes, self.tensor_names)
        if "layer" in sel and self.depth_method == "block_influence" and self.stats is not None:
            sel["layer"] = choose_layers(
                self.source["num_hidden_layers"],
                axis_sizes["num_hidden_layers"],
                "block_influence",
                self.stats,
                getattr(self.config, "layer_types", None),
            )
        updates = {"num_experts_per_tok": changed["num_experts_per_tok"]} if "num_experts_per_tok" in changed else {}
        return select_config(self.spec, self.config, normalize_selection(self.spec, sel), updates)

    def count(self, sizes: Mapping[str, int]) -> tuple[int, int]:
        """`(total, active)` of the source pruned to `sizes`, built on the meta device and counted exactly."""
        key = tuple(sorted((k, v) for k, v in sizes.items() if v != self.source[k]))
        if key not in self.cache:
            counts = count_parameters(self._meta_model(self._config_for(dict(key))))
            self.cache[key] = (counts["total"], counts["active"])
        return self.cache[key]

    @staticmethod
    def _meta_model(config: Any) -> Any:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)

    # -- the rule --
    def solve(
        self, group: Sequence[str], base: Mapping[str, int], ok: Callable[[int, int], bool]
    ) -> dict[str, int] | None:
        """One common ratio over `group` (others at `base`), the largest whose sizes pass `ok(total, active)`, then
        each axis of `group` raised one step at a time, in order, while `ok` holds. None if even the minimum fails."""
        ladders = [self.ladders[a] for a in group]

        def at(r: float) -> dict[str, int]:
            return {**base, **{lad.axis: lad.at(r) for lad in ladders}}

        def passes(choice: Mapping[str, int]) -> bool:
            return ok(*self.count(self.sizes(choice)))

        if not passes(at(0.0)):
            return None
        ratios = sorted({v / lad.top for lad in ladders for v in lad.values})
        lo, hi = 0, len(ratios) - 1  # passes(at(ratios[0])) holds: ratios[0] puts every axis at its minimum
        if passes(at(ratios[hi])):
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if passes(at(ratios[mid])) else (lo, mid)
        choice = at(ratios[lo])
        for lad in ladders:
            while (nxt := lad.above(choice[lad.axis])) is not None and passes({**choice, lad.axis: nxt}):
                choice[lad.axis] = nxt
        return choice


# ---- public API ---------------------------------------------------------------------------------------------------
@dataclass
class BudgetCandidate:
    """One configuration a budget search considered.

    Args:
        sizes (`dict[str, int]`): the sizes (canonical names) of every chosen, fixed or derived axis.
        total (`int`), active (`int`): its parameter counts, as [`hf_slim.utils.count_parameters`] counts them.
        score (`float`, *optional*): what `score_fn` returned (lower is better), when candidates were scored.
    """

    sizes: dict[str, int]
    total: int
    active: int
    score: float | None = None


@dataclass
class BudgetSearch:
    """The outcome of [`search_budget`]: the chosen sizes and every candidate considered (the rule's first).

    Args:
        sizes (`dict[str, int]`): the chosen sizes.
        total (`int`), active (`int`): their parameter counts.
        source_total (`int`), source_active (`int`): the source model's counts.
        target_total (`int`, *optional*), target_active (`int`, *optional*): the budgets, as ints.
        candidates (`list[BudgetCandidate]`): the rule's configuration first, then the depth/width trades.
        best (`int`): index of the chosen candidate.
        trade_axis (`str`, *optional*): the axis the candidates trade against the others.
        allowed (`dict[str, tuple[int, ...]]`): the sizes each chosen axis could take (the rounding grid).
    """

    sizes: dict[str, int]
    total: int
    active: int
    source_total: int
    source_active: int
    target_total: int | None = None
    target_active: int | None = None
    candidates: list[BudgetCandidate] = field(default_factory=list)
    best: int = 0
    trade_axis: str | None = None
    allowed: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def to_markdown(self) -> str:
        """The candidates as a Markdown table (sizes, counts, score), the chosen one marked."""
        keys = list(dict.fromkeys(k for c in self.candidates for k in c.sizes))
        head = ["#", *keys, "total", "active", "score", ""]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, c in enumerate(self.candidates):
            score = "" if c.score is None else f"{c.score:.4f}"
            row = [str(i), *(str(c.sizes.get(k, "")) for k in keys), format_param_count(c.total),
                   format_param_count(c.active), score, "best" if i == self.best else ""]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)


def _source_config(config_or_model: Any) -> Any:
    config = getattr(config_or_model, "config", None)
    if config is not None and hasattr(config, "model_type"):
        return config
    if not hasattr(config_or_model, "model_type"):
        raise TypeError(
            f"config_or_model: expected a transformers config or model, got {type(config_or_model).__name__}"
        )
    return config_or_model


def count_parameters_for(
    config_or_model: Any,
    sizes: Mapping[str, int] | None = None,
    *,
    depth_method: str = "last",
    stats: ImportanceStats | None = None,
) -> dict[str, int]:
    """Parameter counts of a model pruned to `sizes`, from its config alone (built on the meta device).

    Args:
        config_or_model: the source config (or a model, whose config is used).
        sizes (`dict[str, int]`, *optional*): canonical sizes (`hidden_size`, `num_experts`, ...); missing ones keep
            the source's. Prefixes are kept, which gives the same shapes as any other index choice, except for
            which layers stay in models whose layers differ (dense vs sparse, linear vs full attention): with
            `depth_method="block_influence"` and `stats`, the layers block influence would keep are counted.
        depth_method (`str`, defaults to `"last"`), stats ([`ImportanceStats`], *optional*): see above.

    Returns:
        `{"total": ..., "active": ...}` as [`hf_slim.utils.count_parameters`] counts them.
    """
    config = _source_config(config_or_model)
    _check_depth(config, depth_method, stats)
    planner = _Planner(
        config, fixed=dict(sizes or {}), axes=(), has_total=True, has_active=True, depth_method=depth_method,
        stats=stats, multiple_of=64,
    )
    total, active = planner.count(planner.fixed)
    return {"total": total, "active": active}


def search_budget(
    config_or_model: Any,
    *,
    target_total_params: int | float | str | None = None,
    target_active_params: int | float | str | None = None,
    axes: Sequence[str] | None = None,
    fixed: Mapping[str, int] | None = None,
    stats: ImportanceStats | None = None,
    depth_method: str = "last",
    multiple_of: int = 64,
    candidates: int | None = None,
    score_fn: Callable[[dict[str, int]], float] | None = None,
) -> BudgetSearch:
    """Like [`resolve_budget`], returning every candidate and the counts ([`BudgetSearch`]).

    With `candidates=N` and `score_fn`, up to `N` configurations fitting the budget are scored and the lowest
    score wins: the rule's own, then ones that trade depth against width (NVIDIA ModelOpt's Minitron searcher does
    the same over a grid: `MCoreMinitronSearcher.search_best_arch_by_metrics` in
    `modelopt/torch/prune/plugins/mcore_minitron.py` keeps the configurations fitting a `params` /
    `active_params` constraint and validates the top ones with a `score_func`). Here the trade axis is
    `num_hidden_layers` when chosen (else the first chosen axis): it is pinned one step below the rule's value, one
    above, two below, two above, ... (a step is 1/16 of its range, at least one size), and the other chosen axes are
    solved by the rule for each pin; pins that cannot fit are skipped. `score_fn(sizes) -> float` is typically a
    calibration loss of the model pruned to `sizes` (see [`calibration_loss`]); a NaN score ranks last.

    Args:
        See [`resolve_budget`]; the arguments are the same.

    Returns:
        [`BudgetSearch`]: the chosen sizes and counts, the source's counts, the rounding grid (`allowed`) and every
        candidate with its score; `to_markdown()` renders the candidates.

    Raises:
        `ValueError`: as [`resolve_budget`].
    """
    config = _source_config(config_or_model)
    if target_total_params is None and target_active_params is None:
        raise ValueError("resolve_budget: give target_total_params or target_active_params (e.g. '20B')")
    if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1):
        raise ValueError(f"candidates={candidates!r}: must be an int >= 1")
    if candidates is not None and candidates > 1 and score_fn is None:
        raise ValueError(f"candidates={candidates}: scoring candidates needs score_fn (e.g. a calibration loss)")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of!r}: must be an int >= 1")
    _check_depth(config, depth_method, stats)
    planner = _Planner(
        config, fixed=dict(fixed or {}), axes=axes, has_total=target_total_params is not None,
        has_active=target_active_params is not None, depth_method=depth_method, stats=stats, multiple_of=multiple_of,
    )
    source_total, source_active = planner.count({})
    t_total = _target(target_total_params, source_total, "target_total_params", "total")
    t_active = _target(target_active_params, source_active, "target_active_params", "active")
    if t_total is not None and t_active is not None and t_active > t_total:
        raise ValueError(
            f"target_active_params={format_param_count(t_active)} is above target_total_params="
            f"{format_param_count(t_total)}; the active parameters are part of the total"
        )
    if not planner.ladders:
        raise ValueError(
            f"{_budget_words(t_total, t_active)}: no axis is left for the budget to choose (the sizes are fixed or "
            f"absent from {config.model_type}); unset a fixed size or name budget_axes"
        )

    def ok(total: int, active: int) -> bool:
        return (t_total is None or total <= t_total) and (t_active is None or active <= t_active)

    _check_minimum(planner, t_total, t_active)
    split = t_total is not None and t_active is not None and "num_experts" in planner.ladders
    order = list(planner.ladders)
    rule = _solve(planner, order, {}, ok, split, t_total, t_active, strict=True)
    found = [rule]
    tradable = [a for a in order if not (split and a == "num_experts")]
    trade = "num_hidden_layers" if "num_hidden_layers" in tradable else (tradable[0] if tradable else None)
    if candidates and candidates > 1 and trade is not None and len(order) > 1:
        values = planner.ladders[trade].values
        i0 = values.index(rule[trade])
        step = max(1, round(len(values) / 16))
        k = 1
        while len(found) < candidates and (i0 - k * step >= 0 or i0 + k * step < len(values)):
            for i in (i0 - k * step, i0 + k * step):
                if 0 <= i < len(values) and len(found) < candidates:
                    choice = _solve(planner, order, {trade: values[i]}, ok, split, t_total, t_active, strict=False)
                    if choice is not None and choice not in found:
                        found.append(choice)
            k += 1
    result = []
    for choice in found:
        sizes = planner.sizes(choice)
        total, active = planner.count(sizes)
        result.append(BudgetCandidate(sizes=sizes, total=total, active=active))
    best = 0
    if len(result) > 1:
        for c in result:
            c.score = float(score_fn(dict(c.sizes)))  # type: ignore[misc]
        # a NaN score (a diverged candidate) ranks last; ties go to the earlier candidate (the rule's first)
        ranked = [math.inf if math.isnan(c.score) else c.score for c in result]  # type: ignore[arg-type]
        best = min(range(len(result)), key=lambda i: (ranked[i], i))
    chosen = result[best]
    search = BudgetSearch(
        sizes=dict(chosen.sizes), total=chosen.total, active=chosen.active, source_total=source_total,
        source_active=source_active, target_total=t_total, target_active=t_active, candidates=result, best=best,
        trade_axis=trade if len(result) > 1 else None,
        allowed={a: lad.values for a, lad in planner.ladders.items()},
    )
    return search


def resolve_budget(
    config_or_model: Any,
    *,
    target_total_params: int | float | str | None = None,
    target_active_params: int | float | str | None = None,
    axes: Sequence[str] | None = None,
    fixed: Mapping[str, int] | None = None,
    stats: ImportanceStats | None = None,
    depth_method: str = "last",
    multiple_of: int = 64,
    candidates: int | None = None,
    score_fn: Callable[[dict[str, int]], float] | None = None,
) -> dict[str, int]:
    """The sizes that prune a model to a parameter budget, by one deterministic rule.

    **The rule.** Every chosen axis takes the largest allowed size <= `r * (its largest size)`, with one common
    ratio `r` for all chosen axes: the largest `r` whose exact parameter count is within the budget (a binary search
    over the ratios where some size changes; every count is exact, from the configuration built on the meta device).
    Then each chosen axis, in `axes` order, is raised one step at a time while the count stays within the budget, so
    no chosen axis can grow by one step without breaking the budget: the result is as close to the budget as the
    rounding allows, and never above it. With both budgets and `num_experts` among the axes, the other axes take the
    common ratio for the active budget (counted with the fewest experts allowed: experts change what runs per token
    only through the router), then `num_experts` takes the largest allowed size within both budgets. Counts are
    `count_parameters`'s: `total` counts every parameter once (MTP heads included), `active` counts
    `top-k / num_experts` of the routed experts and no MTP head.

    **Allowed sizes** (hardware-friendly steps; on tiny models a step halves until the axis has 8 steps, widths
    staying multiples of 8):

    | axis | step |
    |---|---|
    | `num_hidden_layers` | 1 layer (`last` keeps the first ones) |
    | `hidden_size` | `multiple_of` (64); whole KV groups of heads where `hidden_size == heads * head_dim` (OLMoE) |
    | `moe_intermediate_size`, `shared_expert_intermediate_size`, `intermediate_size` | `multiple_of` (64) |
    | `num_attention_heads` | one query head per KV group (every KV head kept) |
    | `num_key_value_heads` | one KV group (its query heads go with it) |
    | `num_experts` | 8 (ModelOpt's expert divisor), never below top-k |
    | `num_experts_per_tok` | 1 |

    The source size itself is always allowed, so an axis the budget does not need to cut stays whole.

    Args:
        config_or_model: the source config (or model, whose config is used); any supported family.
        target_total_params, target_active_params (`int`, `str` or `float`, *optional*): the budgets: an int, a
            string like `"20B"`, `"3.5B"`, `"800M"`, or a fraction in (0, 1] of the source's count. At least one.
        axes (`Sequence[str]`, *optional*): the sizes the budget chooses, in top-up order. Defaults to
            [`DEFAULT_BUDGET_AXES`] minus the `fixed` ones, the ones the model lacks, and `num_experts` when only an
            active budget is given.
        fixed (`dict[str, int]`, *optional*): sizes the user set (absolute), applied as given.
        stats ([`ImportanceStats`], *optional*), depth_method (`str`, defaults to `"last"`): with
            `"block_influence"` and `stats`, counts keep the layers block influence would keep (which matters only
            when layers differ, e.g. dense and sparse layers); otherwise the first layers.
        multiple_of (`int`, defaults to 64): the step of hidden and FFN widths.
        candidates (`int`, *optional*), score_fn (`Callable[[dict], float]`, *optional*): score up to `candidates`
            configurations fitting the budget (depth traded against width) with `score_fn` (lower is better) and
            return the best; [`search_budget`] returns the table of candidates, which is also logged at INFO.

    Returns:
        `dict[str, int]`: the size of every chosen axis, the fixed sizes, and the sizes that follow from them (query
        heads when KV groups go), in canonical names: `PruneConfig(**sizes)` prunes to it.

    Raises:
        `ValueError`: a budget above the source's count, below what the fixed sizes and the axes' smallest sizes
            allow, two budgets that cannot both be met, unknown or fixed axes, each in one sentence with the numbers.

    Example:
        ```python
        >>> sizes = resolve_budget(model.config, target_total_params="20B", fixed={"num_experts_per_tok": 8})
        >>> small = prune(model, PruneConfig(**sizes), stats)
        ```
    """
    search = search_budget(
        config_or_model, target_total_params=target_total_params, target_active_params=target_active_params,
        axes=axes, fixed=fixed, stats=stats, depth_method=depth_method, multiple_of=multiple_of,
        candidates=candidates, score_fn=score_fn,
    )
    if len(search.candidates) > 1:
        logger.info("budget candidates (trading %s):\n%s", search.trade_axis, search.to_markdown())
    return search.sizes


@torch.no_grad()
def calibration_loss(model: Any, input_ids: torch.Tensor, *, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy of `model` on `[n, length]` token ids: a `score_fn` building block.

    Example:
        ```python
        >>> base = PruneConfig(expert_strategy="reap")
        >>> def score(sizes):
        ...     return calibration_loss(prune(model, dataclasses.replace(base, **sizes), stats), ids)
        >>> sizes = resolve_budget(model, target_total_params="20B", candidates=5, score_fn=score)
        ```
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: expected [n, length >= 2] token ids, got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += float(model(input_ids=batch, labels=batch, use_cache=False).loss) * n
            tokens += n
    finally:
        model.train(was_training)
    return total / tokens


# ---- helpers of search_budget -------------------------------------------------------------------------------------
def _check_depth(config: Any, depth_method: str, stats: ImportanceStats | None) -> None:
    if depth_method not in ("last", "block_influence"):
        raise ValueError(f"depth_method={depth_method!r}: valid values are ['last', 'block_influence']")
    if stats is not None:
        if not isinstance(stats, ImportanceStats):
            raise TypeError(f"stats: expected ImportanceStats or None, got {type(stats).__name__}")
        stats.check_compatible(config)


def _budget_words(t_total: int | None, t_active: int | None) -> str:
    parts = []
    if t_total is not None:
        parts.append(f"target_total_params={format_param_count(t_total)}")
    if t_active is not None:
        parts.append(f"target_active_params={format_param_count(t_active)}")
    return " with ".join(parts)


def _target(value: Any, source: int, name: str, what: str) -> int | None:
    if value is None:
        return None
    target = int(parse_param_count(value, source, name=name))
    if target > source:
        raise ValueError(
            f"{name}={value!r}: above the source model's {format_param_count(source)} {what} parameters "
            f"({source:,}); give at most that"
        )
    return target


def _check_minimum(planner: _Planner, t_total: int | None, t_active: int | None) -> None:
    smallest = planner.sizes({a: lad.values[0] for a, lad in planner.ladders.items()})
    total, active = planner.count(smallest)
    shown = ", ".join(f"{k}={v}" for k, v in smallest.items())
    for name, target, have, what in (
        ("target_total_params", t_total, total, "total"),
        ("target_active_params", t_active, active, "active"),
    ):
        if target is not None and have > target:
            raise ValueError(
                f"{name}={format_param_count(target)}: below the smallest model the budget axes and fixed sizes allow "
                f"({shown}: {format_param_count(have)} {what} parameters); raise it, or free more axes"
            )


def _solve(
    planner: _Planner,
    order: Sequence[str],
    pinned: Mapping[str, int],
    ok: Callable[[int, int], bool],
    split: bool,
    t_total: int | None,
    t_active: int | None,
    *,
    strict: bool,
) -> dict[str, int] | None:
    """The rule for the axes `order` (those in `pinned` held). `strict` raises where a candidate is only skipped.

    `split` (both budgets, `num_experts` chosen): the other axes take the common ratio for the active budget (with the
    fewest experts allowed, so that some expert count always fits it), then `num_experts` the largest allowed size
    within both budgets."""
    group = [a for a in order if a not in pinned and not (split and a == "num_experts")]
    if not split:
        if not group:
            return dict(pinned) if ok(*planner.count(planner.sizes(pinned))) else None
        return planner.solve(group, pinned, ok)
    assert t_total is not None and t_active is not None  # split means both budgets
    experts = planner.ladders["num_experts"]
    base = {**pinned, "num_experts": experts.values[0]}
    choice = planner.solve(group, base, lambda total, active: active <= t_active) if group else dict(base)
    if choice is None:
        return None
    fits = [v for v in experts.values if ok(*planner.count(planner.sizes({**choice, "num_experts": v})))]
    if not fits:
        if not strict:
            return None
        total, active = planner.count(planner.sizes(choice))
        raise ValueError(
            f"target_total_params={format_param_count(t_total)} and target_active_params="
            f"{format_param_count(t_active)} cannot both be met: at {format_param_count(active)} active "
            f"parameters even the fewest experts allowed ({experts.values[0]}) leave {format_param_count(total)} "
            f"total; raise target_total_params to at least that or lower target_active_params"
        )
    choice["num_experts"] = fits[-1]
    return choice
