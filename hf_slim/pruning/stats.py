"""`ImportanceStats`: calibration statistics as named tensors, saved and loaded as safetensors (no pickle)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ImportanceStats", "STAT_KEYS", "STAT_KEYS_SINCE"]

#: What each tensor holds (L = blocks: the decoder layers, then MTP layers where the model has them;
#: H = hidden, E = experts, I = expert width, nH = attention heads).
STAT_KEYS = {
    "hidden.norm_abs_mean": "[L, 2, H] mean |RMSNorm output| per channel at input/post-attention norms (SlimQwen)",
    "hidden.final_abs_mean": "[H] mean |final norm output| per channel",
    "hidden.minitron": "[L, 2, H] per channel: mean over sequence, then L2 over samples (Minitron)",
    "hidden.final_minitron": "[H] Minitron aggregation at the final norm",
    "hidden.minitron_modelopt": "[L, 2, H] per channel: sum over samples of (mean over sequence of |x|)^2, NVIDIA "
    "ModelOpt's accumulator (the score takes the square root: L2 over samples)",
    "layer.block_influence": "[L] mean over tokens of 1 - cos(layer input, layer output)",
    "layer.sparse": "[L] 1 where the layer has routed experts",
    "layer.attention": "[L] 1 where the layer has softmax attention (head statistics valid)",
    "layer.dense": "[L] 1 where the layer has a dense FFN",
    "head.out_norm": "[L, nH] mean L2 norm of each head's attention output (input of o_proj)",
    "expert.frequency": "[L, E] fraction of tokens routed to each expert",
    "expert.soft": "[L, E] mean over tokens of 1{i in top-k} * z_i / sum_{j in top-k} z_j",
    "expert.reap": "[L, E] mean over routed tokens of gate weight * ||expert output||_2 (REAP)",
    "expert.count": "[L, E] routed tokens per expert",
    "expert.router_gram": "[L, E, E] sum over tokens of router-logit outer products (logit-profile similarity)",
    "expert.mean_output": "[L, E, H] mean expert output over its routed tokens",
    "expert_ffn.act": "[L, E, I] mean |act(gate) * up| at the down-projection input, over routed tokens",
    "shared_ffn.act": "[L, I_shared] mean |activation| at the shared expert's down-projection input",
    "ffn.act": "[L, I_dense] mean |activation| at the dense FFN's down-projection input",
}

#: The hf-slim version that first collects a key; statistics saved by an older version lack it, and the scores that
#: need it say so (`re-run collect_statistics`). Keys not listed here were collected from the start.
STAT_KEYS_SINCE = {"hidden.minitron_modelopt": "0.2.0"}


@dataclass
class ImportanceStats:
    """Calibration statistics of one model, indexed like the source model (layers, experts, channels).

    Args:
        tensors (`dict[str, torch.Tensor]`): see [`STAT_KEYS`]; keys absent from a model (no shared expert, no
            dense layer) are simply missing.
        metadata (`dict`): `model_type`, `num_tokens`, `num_samples`, `max_length` and the source `sizes`
            (`num_hidden_layers`, `hidden_size`, `num_attention_heads`, `num_experts`, ...), used to refuse
            statistics from another model.
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise KeyError(f"statistic {key!r} was not collected; available: {sorted(self.tensors)}")
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    @property
    def num_tokens(self) -> int:
        return int(self.metadata.get("num_tokens", 0))

    def save(self, path: str | os.PathLike) -> str:
        """Write to a `.safetensors` file (atomically: temp file beside the target, then rename)."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()},
                tmp,
                metadata={"format": "pt", "hf_slim_stats": json.dumps(self.metadata)},
            )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImportanceStats":
        """Read a file written by [`ImportanceStats.save`]."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "hf_slim_stats" not in meta:
                raise ValueError(f"{path} is not an hf-slim statistics file (no 'hf_slim_stats' metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(tensors=tensors, metadata=json.loads(meta["hf_slim_stats"]))

    def check_compatible(self, config: Any) -> None:
        """Raise `ValueError` naming the first size that differs between these statistics and `config`."""
        from ..anatomy import get_spec

        spec = get_spec(config)
        if self.metadata.get("model_type") not in (None, config.model_type):
            raise ValueError(
                f"stats: collected on model_type={self.metadata.get('model_type')!r}, the model is "
                f"{config.model_type!r}"
            )
        for key, value in self.metadata.get("sizes", {}).items():
            have = getattr(config, spec.field(key), None)
            if have is not None and value is not None and have != value:
                raise ValueError(
                    f"stats: collected on a model with {key}={value}, this model has {key}={have}; "
                    f"re-run collect_statistics on this model"
                )

    def summary(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in sorted(self.tensors.items())}
