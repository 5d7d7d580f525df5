"""Neuron-health instrumentation: how evenly an optimizer's updates reach the neurons of each MLP.

Muon's orthogonalized update of a tall matrix cannot give every row the same norm; rows (MLP neurons)
that keep receiving tiny updates stop learning ("dead neurons"). Aurora targets exactly this.
`NeuronHealthCallback` measures it from the weights themselves: it snapshots each MLP projection right
before the optimizer step and, right after, takes the norm of the change per neuron.

A neuron is a row of an up/gate projection (``[..., out, in]``: one output feature) and a column of a
down projection (one input feature); fused experts ``[E, ...]`` count ``E`` times as many neurons.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback


__all__ = ["DEFAULT_MLP_PATTERN", "NeuronHealthCallback", "neuron_update_norms"]

DEFAULT_MLP_PATTERN = r"(?:^|\.)(?:gate_up_proj|gate_proj|up_proj|down_proj|fc1|fc2|w1|w2|w3)(?:\.weight)?$"
"""Parameter names treated as MLP projections (dense and fused-expert layouts of transformers models)."""

_DOWN_RE = re.compile(r"(?:^|\.)(?:down_proj|fc2|w2)(?:\.weight)?$")
_KIND_RE = re.compile(r"(?:^|\.)(gate_up_proj|gate_proj|up_proj|down_proj|fc1|fc2|w1|w2|w3)(?:\.weight)?$")


def neuron_update_norms(delta: torch.Tensor, name: str) -> torch.Tensor:
    """Norm of a weight change per neuron, flattened over experts.

    Args:
        delta (`torch.Tensor` of shape `[..., out, in]`): Weight after the step minus before.
        name (`str`): Parameter name; down projections (`down_proj`, `fc2`, `w2`) have neurons as columns.

    Returns:
        `torch.Tensor`: 1D float32 tensor, one entry per neuron.
    """
    dim = -2 if _DOWN_RE.search(name) else -1
    return delta.float().norm(dim=dim).reshape(-1)


class NeuronHealthCallback(TrainerCallback):
    """Log the dead-neuron fraction and the row-norm spread of each MLP projection's updates.

    Every ``every_n_steps`` optimizer steps it records, per projection, each neuron's update norm divided by
    the median over that projection's neurons. A neuron is *dead* when this ratio stayed below
    ``threshold`` at every one of the last ``window`` records. Logged keys (added to the Trainer's
    ``logs`` and to ``state.log_history``):

    - ``neuron_health/dead_frac``: dead neurons / all tracked neurons;
    - ``neuron_health/row_spread``: median over projections of the p90 / p10 ratio of update norms (1 is
      perfectly even; Muon on tall matrices is typically far above 1);
    - ``neuron_health/<kind>/dead_frac`` and ``.../row_spread`` per projection kind (`gate_proj`, `up_proj`,
      `down_proj`, `gate_up_proj`, ...), or per parameter name with ``per_parameter=True``.

    The snapshot costs one copy of the tracked weights during the step, only on measured steps.

    Args:
        threshold (`float`, *optional*, defaults to 0.1): Ratio to the median below which a neuron counts as idle.
        window (`int`, *optional*, defaults to 10): Number of consecutive records a neuron must stay idle.
        every_n_steps (`int`, *optional*, defaults to 1): Measure on every n-th optimizer step.
        pattern (`str`, *optional*): Regex on parameter names selecting MLP projections (`DEFAULT_MLP_PATTERN`).
        per_parameter (`bool`, *optional*, defaults to `False`): Log per parameter instead of per kind.
    """

    def __init__(
        self,
        threshold: float = 0.1,
        window: int = 10,
        every_n_steps: int = 1,
        pattern: str = DEFAULT_MLP_PATTERN,
        per_parameter: bool = False,
    ) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"threshold={threshold!r} must be in (0, 1)")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} must be a positive integer")
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive integer")
        self.threshold = threshold
        self.window = window
        self.every_n_steps = every_n_steps
        self.pattern = re.compile(pattern)
        self.per_parameter = per_parameter
        self._snapshots: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
        self._idle: dict[str, deque] = {}
        self.latest: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    def _tracked(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad and p.ndim >= 2 and self.pattern.search(n)
        ]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        self._snapshots = {}
        if model is None or state.global_step % self.every_n_steps:
            return
        self._snapshots = {n: (p, p.detach().clone()) for n, p in self._tracked(model)}

    @torch.no_grad()
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._snapshots:
            return
        groups: dict[str, list[tuple[torch.Tensor, float]]] = {}
        for name, (p, before) in self._snapshots.items():
            norms = neuron_update_norms(p.detach() - before, name)
            median = norms.median().clamp(min=1e-30)
            idle = norms / median < self.threshold
            window = self._idle.setdefault(name, deque(maxlen=self.window))
            window.append(idle.cpu())
            dead = torch.stack(list(window)).all(0) if len(window) == self.window else torch.zeros_like(idle.cpu())
            q = torch.quantile(norms, torch.tensor([0.1, 0.9], device=norms.device))
            spread = float(q[1] / q[0].clamp(min=1e-30))
            kind = name if self.per_parameter else (m.group(1) if (m := _KIND_RE.search(name)) else name)
            groups.setdefault(kind, []).append((dead, spread))
        self._snapshots = {}
        metrics: dict[str, float] = {}
        all_dead, all_spread = [], []
        for kind, items in sorted(groups.items()):
            dead = torch.cat([d.float() for d, _ in items])
            spreads = torch.tensor([s for _, s in items])
            metrics[f"neuron_health/{kind}/dead_frac"] = float(dead.mean())
            metrics[f"neuron_health/{kind}/row_spread"] = float(spreads.median())
            all_dead.append(dead)
            all_spread.append(spreads)
        metrics["neuron_health/dead_frac"] = float(torch.cat(all_dead).mean())
        metrics["neuron_health/row_spread"] = float(torch.cat(all_spread).median())
        self.latest = metrics
        self.history.append({"step": float(state.global_step + 1), **metrics})

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not self.latest or logs is None or "loss" not in logs:
            return
        logs.update(self.latest)
        if state.log_history:
            state.log_history[-1].update(self.latest)
