"""What both calibration passes share: the packed calibration set and the statistic hooks, installed block by block.

`hf_slim.pruning.calibration` runs them on a model in memory, `hf_slim.pruning.layerwise` on one materialised block
of a checkpoint at a time; both fill the same accumulators in the same order, so they record the same statistics.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..anatomy.vocabulary import AXIS_SIZE_FIELDS
from ..integrations.transformers_experts import grouped_linear_kernel as _grouped_linear_kernel
from ..integrations.transformers_mtp import mtp_drafter, run_mtp_depth
from .mtp_layers import attached_mtp_blocks, detach_mtp_layers, load_mtp_layers
from .stats import ImportanceStats

__all__ = ["pack_calibration_data"]


def _token_lists(data: Any, tokenizer: Any, text_column: str) -> list[list[int]]:
    if isinstance(data, torch.Tensor):
        if data.ndim == 1:
            return [data.tolist()]
        if data.ndim == 2:
            return [row.tolist() for row in data]
        raise ValueError(f"data: a token tensor must be 1-D or 2-D, got shape {tuple(data.shape)}")
    import datasets  # imported here so `import hf_slim` stays light

    if isinstance(data, datasets.Dataset):
        if "input_ids" in data.column_names:
            return [list(map(int, r)) for r in data["input_ids"]]
        if text_column in data.column_names:
            data = list(data[text_column])
        else:
            raise ValueError(
                f"data: the dataset has columns {data.column_names}; expected 'input_ids' or text_column="
                f"{text_column!r}"
            )
    if isinstance(data, str):
        data = [data]
    data = list(data)
    out: list[list[int]] = []
    for item in data:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("tokenizer: text calibration data needs a tokenizer (or pass token ids)")
            if callable(getattr(tokenizer, "encode", None)):
                ids = list(tokenizer.encode(item, add_special_tokens=False))
                eos = getattr(tokenizer, "eos_token_id", None)
                if isinstance(eos, int):
                    ids.append(eos)  # keeps documents apart once packed
            else:  # a plain callable: text -> ids
                ids = tokenizer(item)
            out.append([int(t) for t in ids])
        elif isinstance(item, torch.Tensor):
            out.append(item.flatten().tolist())
        elif isinstance(item, Sequence):
            out.append([int(t) for t in item])
        elif isinstance(item, dict) and "input_ids" in item:
            out.append([int(t) for t in item["input_ids"]])
        else:
            raise TypeError(f"data: cannot use an item of type {type(item).__name__}; give texts or token ids")
    return out


def pack_calibration_data(
    data: Any,
    *,
    tokenizer: Any = None,
    num_samples: int = 1024,
    max_length: int = 2048,
    text_column: str = "text",
) -> torch.Tensor:
    """Concatenate the calibration data into one token stream and cut it into `[n, max_length]` rows (no padding).

    Raises:
        `ValueError`: if the data holds fewer than `max_length` tokens (an empty calibration set).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: must be >= 1")
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: must be >= 2")
    stream: list[int] = []
    need = num_samples * max_length
    for ids in _token_lists(data, tokenizer, text_column):
        stream.extend(ids)
        if len(stream) >= need:
            break
    n = min(num_samples, len(stream) // max_length)
    if n == 0:
        raise ValueError(
            f"data: the calibration set is empty or shorter than one sample ({len(stream)} tokens < "
            f"max_length={max_length})"
        )
    return torch.tensor(stream[: n * max_length], dtype=torch.long).view(n, max_length)


def input_device(model: Any) -> torch.device:
    """Where a model's forward takes its `input_ids`: the device of the input embeddings.

    For a model dispatched by accelerate (`from_pretrained(..., device_map=...)`) whose embeddings are offloaded
    (their weight on the meta device until a hook loads it), this is the device accelerate runs them on, read from
    `model.hf_device_map`: the embeddings' own device when it is an accelerator, else accelerate's main device (the
    first accelerator in the map, or the CPU).
    """
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    device_map = getattr(model, "hf_device_map", None) or {}
    name = next((n for n, m in model.named_modules() if m is embeddings), "")
    owner = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    placed = [device_map[owner]] if owner is not None else []
    for device in placed + list(device_map.values()):
        if device not in ("cpu", "disk"):
            return torch.device(device)
    return torch.device("cpu")


def unloaded_modules(model: Any) -> list[str]:
    """Modules with parameters on the meta device that no accelerate offloading hook (on the module or a parent)
    loads: a forward cannot run them (a model built on the meta device, or loaded without its weights)."""
    from accelerate.utils import has_offloaded_params

    held: list[str] = []
    out = []
    for name, module in model.named_modules():
        if has_offloaded_params(module):
            held.append(name)
        elif any(p.device.type == "meta" for p in module.parameters(recurse=False)) and not any(
            h == "" or name.startswith(h + ".") for h in held
        ):
            out.append(name)
    return out


def _index_add(acc: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """`acc.index_add_(0, index, values)` where `index` and `values` may live on another device than `acc` (a block
    of a dispatched model): the rows are summed where `values` are, and only the result moves."""
    if values.device == acc.device:
        acc.index_add_(0, index, values)
    else:
        acc += values.new_zeros(acc.shape).index_add_(0, index, values).to(acc.device)


class _Collector:
    """Accumulators and hooks; everything accumulates in float32 on `device`.

    `device` defaults to where the model takes its inputs ([`input_device`]).
    Every hook reduces on the device its block runs on and moves only the reduced tensor to the accumulators, so
    the blocks of a model dispatched by accelerate may run on different devices, or be offloaded (the patched
    experts forward loads an offloaded module's weights for the call, as accelerate's hook would).

    Hooks go in block by block (`install_block`, `install_final`), so the in-memory pass (every block at once) and
    the layer-by-layer pass (one materialised block at a time, see `hf_slim.pruning.layerwise`) share one code path.
    """

    def __init__(self, model: Any, spec: Any, device: Any = None):
        self.model = model
        self.spec = spec
        self.config = model.config
        # GLM-4-MoE / DeepSeek-V3: a loaded model gets its checkpoint's MTP layers for the pass (`remove` takes them
        # off); the layer-by-layer skeleton holds them already. They run after the forward, as the drafter runs them.
        held = attached_mtp_blocks(model, spec)
        self.loaded_mtp = [] if held or any(p.is_meta for p in model.parameters()) else load_mtp_layers(model)
        self.trailing_mtp = held or self.loaded_mtp
        self._final_hidden: torch.Tensor | None = None
        # decoder layers first, then other blocks (MTP layers): statistics index i is blocks[i]
        self.blocks = spec.blocks(model)
        self.layers = [model.get_submodule(b) for b in self.blocks]
        self.L = len(self.layers)
        self.dev = torch.device(device) if device is not None else input_device(model)
        self.H = self.config.hidden_size
        self.handles: list[Any] = []
        self.patched: list[tuple[Any, Any]] = []  # (module, the forward its __dict__ held before: accelerate's)
        self.acc: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.samples = 0

    def zeros(self, key: str, *shape: int) -> torch.Tensor:
        if key not in self.acc:
            self.acc[key] = torch.zeros(*shape, device=self.dev, dtype=torch.float32)
        return self.acc[key]

    def install(self) -> None:
        """Hooks on every block and the final norm (the in-memory pass)."""
        self.allocate()
        for i in range(self.L):
            self.install_block(i)
        self.install_final()
        if self.trailing_mtp:
            drafter = mtp_drafter(self.model, [self.model.get_submodule(b) for b in self.trailing_mtp])
            self.handles.append(self.model.register_forward_hook(self._run_mtp(drafter), with_kwargs=True))

    def _run_mtp(self, drafter: Any):
        """After each forward: MTP depth after depth on the batch, from the main model's normed last hidden state."""
        blocks = [self.model.get_submodule(b) for b in self.trailing_mtp]

        def hook(_m, args, kwargs, _out):
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            previous, self._final_hidden = self._final_hidden, None
            for k in range(min(len(blocks), ids.shape[1] - 1)):  # depth k + 1 needs a position
                device = next(blocks[k].buffers()).device  # placed with the last decoder layer
                previous = run_mtp_depth(drafter, k, ids, previous.to(device))

        return hook

    def allocate(self) -> None:
        """The accumulators every model has; the others appear with the first block that feeds them."""
        L, H = self.L, self.H
        self.zeros("hidden.norm_abs_mean", L, 2, H)
        self.zeros("hidden.minitron", L, 2, H)
        self.zeros("hidden.minitron_modelopt", L, 2, H)
        self.zeros("layer.block_influence", L)
        self.zeros("_block_tokens", L)
        for key in ("layer.sparse", "layer.attention", "layer.dense"):
            self.zeros(key, L)
        if _get(self.model, self.spec.modules["final_norm"]) is not None:
            self.zeros("hidden.final_abs_mean", H)
            self.zeros("hidden.final_minitron", H)

    def install_block(self, i: int) -> None:
        """Hooks on block `i` (statistics index `i`); its weights must be materialised on the collector's device."""
        mods = self.spec.modules
        layer = self.layers[i]
        norm_names = [n for n in mods["decoder_norms"].split(",") if n]
        for j, nname in enumerate(norm_names[:2]):
            self._hook_norm(layer.get_submodule(nname), i, j)
        self.handles.append(layer.register_forward_pre_hook(self._layer_in(i), with_kwargs=True))
        self.handles.append(layer.register_forward_hook(self._layer_out(i)))
        attn = _get(layer, mods["attn_out"])
        if attn is not None:
            self.acc["layer.attention"][i] = 1
            self.handles.append(attn.register_forward_pre_hook(self._heads(i)))
        experts, router = _get(layer, mods["experts"]), _get(layer, mods["router"])
        if experts is not None and router is not None:
            self.acc["layer.sparse"][i] = 1
            self._patch_experts(experts, i)
            self.handles.append(router.register_forward_hook(self._router(i)))
            shared = _get(layer, mods["shared_down"])
            if shared is not None:
                self.handles.append(shared.register_forward_pre_hook(self._act("shared_ffn.act", i)))
        dense = _get(layer, mods["dense_down"])
        if dense is not None:
            self.acc["layer.dense"][i] = 1
            self.handles.append(dense.register_forward_pre_hook(self._act("ffn.act", i)))

    def install_final(self) -> None:
        """The hook on the final norm (no-op for a model without one)."""
        final = _get(self.model, self.spec.modules["final_norm"])
        if final is not None:
            self.handles.append(final.register_forward_hook(self._final_norm))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for module, old in self.patched:
            if old is None:
                del module.forward
            else:
                module.forward = old
        self.handles, self.patched = [], []
        if self.loaded_mtp:
            detach_mtp_layers(self.model, spec=self.spec)
            self.loaded_mtp = []

    # ---- hooks ---------------------------------------------------------------------------------------------
    def _hook_norm(self, module: Any, i: int, j: int) -> None:
        def hook(_m, _args, out):
            x, dev = out.detach().float(), self.dev
            self.acc["hidden.norm_abs_mean"][i, j] += x.abs().sum(dim=(0, 1)).to(dev)
            self.acc["hidden.minitron"][i, j] += x.mean(dim=1).pow(2).sum(dim=0).to(dev)
            self.acc["hidden.minitron_modelopt"][i, j] += x.abs().mean(dim=1).pow(2).sum(dim=0).to(dev)  # a sum

        self.handles.append(module.register_forward_hook(hook))

    def _final_norm(self, _m, _args, out):
        if self.trailing_mtp:
            self._final_hidden = out.detach()
        x = out.detach().float()
        self.acc["hidden.final_abs_mean"] += x.abs().sum(dim=(0, 1)).to(self.dev)
        self.acc["hidden.final_minitron"] += x.mean(dim=1).pow(2).sum(dim=0).to(self.dev)

    def _layer_in(self, i: int):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self._last_in = x.detach()
            # MTP blocks see fewer positions than decoder layers: every block keeps its own token count
            self.acc["_block_tokens"][i] += x.shape[:-1].numel()

        return hook

    def _layer_out(self, i: int):
        def hook(_m, _args, out):
            y = out[0] if isinstance(out, tuple) else out
            # the input is seen before accelerate's hook moves it to the block's device
            cos = F.cosine_similarity(self._last_in.to(y.device).float(), y.detach().float(), dim=-1)
            self.acc["layer.block_influence"][i] += (1 - cos).sum().to(self.dev)

        return hook

    def _heads(self, i: int):
        n_heads = self.config.num_attention_heads

        def hook(_m, args):
            x = args[0].detach().float()
            norms = x.reshape(-1, n_heads, x.shape[-1] // n_heads).norm(dim=-1).sum(0)
            self.zeros("head.out_norm", self.L, n_heads)[i] += norms.to(self.dev)

        return hook

    def _act(self, key: str, i: int):
        def hook(_m, args):
            x = args[0].detach().float()
            self.zeros(key, self.L, x.shape[-1])[i] += x.reshape(-1, x.shape[-1]).abs().sum(0).to(self.dev)

        return hook

    def _router(self, i: int):
        def hook(_m, _args, out):
            logits = (out[0] if isinstance(out, tuple) else out).detach().float()
            logits = logits.reshape(-1, logits.shape[-1])
            E = logits.shape[-1]
            self.zeros("expert.router_gram", self.L, E, E)[i] += (logits.T @ logits).to(self.dev)

        return hook

    def _widest_expert_ffn(self) -> int:
        # shapes only: an offloaded parameter is a meta tensor of the right shape
        return max(
            p.shape[1] // 2 for name, p in self.model.named_parameters() if name.endswith("gate_up_proj") and p.dim() == 3
        )

    def _patch_experts(self, experts: Any, i: int) -> None:
        E, two_i, H = experts.gate_up_proj.shape  # the shape only: offloaded weights are meta until the hook runs
        n_ffn = two_i // 2
        count = self.zeros("expert.count", self.L, E)
        soft = self.zeros("expert.soft", self.L, E)
        reap = self.zeros("expert.reap", self.L, E)
        mean_out = self.zeros("expert.mean_output", self.L, E, H)
        # stored at the widest expert width of the model; narrower blocks (per-layer widths) fill a prefix
        act = self.zeros("expert_ffn.act", self.L, E, self._widest_expert_ffn())

        def calibration_forward(self, hidden_states, top_k_index, top_k_weights):
            # The arithmetic of transformers' eager experts loop, with tokens grouped by expert once and every
            # statistic computed in a few batched ops after the loop (collect_statistics runs under no_grad).
            # Statistics are reduced on the device this block runs on and added to the accumulators there
            # (`_index_add`), so a dispatched model's blocks may run anywhere.
            grouped_linear = _grouped_linear_kernel(self)  # here the weights are real, even when offloaded
            idx = top_k_index.reshape(-1, top_k_index.shape[-1])
            w = top_k_weights.reshape(idx.shape).to(hidden_states.dtype)
            flat = idx.flatten()
            per_expert = torch.bincount(flat, minlength=E)[:E]
            count[i] += per_expert.float().to(count.device)
            share = w.float() / w.float().sum(-1, keepdim=True).clamp_min(1e-20)
            _index_add(soft[i], flat, share.flatten())
            order = torch.argsort(flat, stable=True)
            tok = order // idx.shape[-1]
            e_sorted = flat[order]
            gw = w.flatten()[order]
            x = hidden_states[tok]
            if grouped_linear is not None:  # the grouped GEMM of transformers' default `grouped_mm` experts
                offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
                gate, up = grouped_linear(x, self.gate_up_proj, offsets).chunk(2, dim=-1)
                h_all = self.act_fn(gate) * up
                y_all = grouped_linear(h_all, self.down_proj, offsets)
            else:
                h_all = x.new_empty(x.shape[0], n_ffn)
                y_all = x.new_empty(x.shape[0], H)
                start = 0
                for e, n in enumerate(per_expert.tolist()):
                    if n == 0:
                        continue
                    rows = slice(start, start + n)
                    start += n
                    gate, up = F.linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
                    torch.mul(self.act_fn(gate), up, out=h_all[rows])
                    torch.mm(h_all[rows], self.down_proj[e].T, out=y_all[rows])
            _index_add(act[i, :, :n_ffn], e_sorted, h_all.float().abs())
            yf = y_all.float()
            _index_add(reap[i], e_sorted, gw.float() * yf.norm(dim=-1))
            _index_add(mean_out[i], e_sorted, yf)
            out = torch.zeros_like(hidden_states)
            out.index_add_(0, tok, (y_all * gw[:, None]).to(out.dtype))
            return out

        from accelerate.utils import align_module_device

        def forward(self, hidden_states, top_k_index, top_k_weights):
            # This replaces the module's forward, and with it the wrapper accelerate put there (which would load an
            # offloaded module's weights around the call): the public `align_module_device` loads them instead, for
            # the call; for a module that is not offloaded it does nothing.
            with align_module_device(self):
                return calibration_forward(self, hidden_states, top_k_index, top_k_weights)

        self.patched.append((experts, experts.__dict__.get("forward")))
        experts.forward = types.MethodType(forward, experts)

    def metadata(self, max_length: int) -> dict[str, Any]:
        """What [`ImportanceStats.metadata`] records about the run and the source model."""
        return {
            "model_type": self.config.model_type,
            "num_tokens": self.tokens,
            "num_samples": self.samples,
            "max_length": max_length,
            "sizes": _sizes(self.spec, self.config),
            "blocks": self.blocks,
        }

    def finish(self, metadata: dict[str, Any]) -> ImportanceStats:
        t_all = max(self.tokens, 1)
        t = self.acc.pop("_block_tokens").cpu().clamp_min(1)  # [L]
        out: dict[str, torch.Tensor] = {}
        for key, v in self.acc.items():
            v = v.cpu()
            if key == "hidden.final_abs_mean":
                v = v / t_all
            elif key in ("hidden.norm_abs_mean", "layer.block_influence", "head.out_norm", "shared_ffn.act",
                         "ffn.act", "expert.soft"):
                v = v / t.view(-1, *([1] * (v.ndim - 1)))
            elif key in ("hidden.minitron", "hidden.final_minitron"):
                v = v.sqrt()
            out[key] = v
        if "expert.count" in out:
            cnt = out["expert.count"]
            safe = cnt.clamp_min(1)
            out["expert.frequency"] = cnt / t[:, None]
            out["expert.reap"] = out["expert.reap"] / safe
            out["expert.mean_output"] = out["expert.mean_output"] / safe[..., None]
            out["expert_ffn.act"] = out["expert_ffn.act"] / safe[..., None]
        return ImportanceStats(tensors=out, metadata=metadata)


def _get(root: Any, path: str) -> Any:
    if not path:
        return None
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _sizes(spec: Any, config: Any) -> dict[str, Any]:
    fields = ((k, getattr(config, spec.field(k), None)) for k in AXIS_SIZE_FIELDS)
    return {k: v for k, v in fields if v is not None}
