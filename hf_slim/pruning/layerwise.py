"""Layer-by-layer calibration: the statistics of [`collect_statistics`] from a checkpoint larger than memory.

The model is built on the meta device from the checkpoint's config. The calibration set goes through the model's own
forward once with every decoder layer replaced by a recorder, which gives the first layer's input and what the model
passes each layer (positional embeddings, causal masks, position ids, flags). Then one block at a time is read from
the checkpoint, given the same hooks as the in-memory pass (`collector.py`), run on every calibration batch with
those arguments, and put back on the meta device. The final norm and SlimMoe's MTP blocks follow, as the model's
forward runs them. The hidden states between blocks stay in memory when they fit, else in a file of the work folder.

With a `work_dir`, every finished step leaves its hidden states, the accumulators and a progress file there
(each written to a temporary name, then renamed), so a killed run continues after the last finished step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..anatomy.mtp_blocks import attach_mtp_layers
from ..integrations.transformers_mtp import mtp_drafter, run_mtp_depth
from ..utils import format_bytes
from .collector import _Collector, _get, pack_calibration_data
from .layerwise_state import HiddenStates, WorkDir
from .stats import ImportanceStats

__all__ = ["LayerwiseCalibrationError", "collect_statistics_layerwise"]

logger = logging.getLogger(__name__)

_FORMAT = 1  # of the work folder; a different number is a different fingerprint
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
    "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "f32": torch.float32, "f16": torch.float16, "float64": torch.float64, "f64": torch.float64,
}  # fmt: skip


@torch.no_grad()
def collect_statistics_layerwise(
    source: Any,
    data: Any,
    num_samples: int = 1024,
    max_length: int = 2048,
    batch_size: int = 8,
    *,
    tokenizer: Any = None,
    text_column: str = "text",
    dtype: Any = None,
    device: Any = "cpu",
    max_memory: int | str | None = None,
    work_dir: str | os.PathLike | None = None,
    keep_work_files: bool = False,
    show_progress: bool = True,
) -> ImportanceStats:
    """Collect the statistics of [`collect_statistics`] from a checkpoint, holding one block in memory at a time.

    Records every key and the same metadata as the in-memory pass (tested equal for every supported family).

    Args:
        source (`str`, `os.PathLike` or `CheckpointReader`): a checkpoint folder, a Hub id, or an open reader
            (`hf_slim.checkpoints.open_checkpoint`, `StateDictReader`); a reader passed in is not closed.
        data: the calibration data, as for [`collect_statistics`].
        num_samples (`int`, defaults to 1024): number of sequences.
        max_length (`int`, defaults to 2048): tokens per sequence.
        batch_size (`int`, defaults to 8): sequences per block call.
        tokenizer: a tokenizer for text data.
        text_column (`str`, defaults to `"text"`): column of a text dataset.
        dtype (`torch.dtype` or `str`, *optional*): the dtype blocks run in; `None` keeps the checkpoint's own
            (a bf16 checkpoint runs in bf16).
        device (`str` or `torch.device`, defaults to `"cpu"`): where blocks run. The hidden states stay in host
            memory (or the work folder) and go to the device one batch at a time.
        max_memory (`int` or `str`, *optional*): host memory to use, in bytes or as a string like `"20GB"` or
            `"16GiB"`; defaults to the available RAM. The hidden states of the whole calibration set stay in memory
            when they fit beside the largest block and its working space, else they go to a file in `work_dir`.
        work_dir (`str` or `os.PathLike`, *optional*): folder for the spilled hidden states and for resuming: after
            each block it holds that block's output and the statistics so far, and a new call with the same folder
            and the same inputs continues after the last finished block. `None`: a temporary folder when spilling,
            and no resuming.
        keep_work_files (`bool`, defaults to `False`): keep the work files after success (a new call then returns
            the same statistics at once); by default they are removed, and the folder too when that empties it.
        show_progress (`bool`, defaults to `True`): show a tqdm bar over the blocks.

    Returns:
        [`ImportanceStats`] indexed like the source model.

    Raises:
        `ValueError`: bad sizes, an unknown dtype or device, an unreadable `max_memory`, a `max_memory` below what
            one block needs, a checkpoint missing a tensor or holding another shape, or a `work_dir` holding a run
            with different inputs (the message names what differs).
        [`LayerwiseCalibrationError`] (a `ValueError`): a model whose forward or computed buffers this pass cannot
            reproduce block by block (none of the supported families); load it and call
            `collect_statistics(model, ...)`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    dev = _device(device)
    budget = _parse_memory(max_memory)
    ids = pack_calibration_data(
        data, tokenizer=tokenizer, num_samples=num_samples, max_length=max_length, text_column=text_column
    )
    reader, owned = _open(source)
    try:
        run = _Run(reader, ids, _run_dtype(reader, dtype), dev, batch_size)
        return _drive(run, budget, max_memory, work_dir, keep_work_files, show_progress, "layerwise calibration",
                      lambda: run.collector.finish(run.collector.metadata(int(ids.shape[1]))))  # fmt: skip
    finally:
        if owned:
            reader.close()


def _drive(run: _Run, budget: int, max_memory: Any, work_dir: Any, keep_work_files: bool, show_progress: bool,
           desc: str, finish: Callable[[], Any]) -> Any:  # fmt: skip
    """Run the steps of `run` not done yet (resuming from `work_dir`), then return `finish()`, called before the
    hidden states are let go and the work files removed."""
    from tqdm.auto import tqdm

    plan = run.memory_plan(budget, max_memory)
    fingerprint = run.fingerprint()
    folder = None
    if work_dir is not None:
        folder = WorkDir(os.fspath(work_dir), fingerprint, temporary=False)
    elif not plan.in_memory:
        folder = WorkDir(tempfile.mkdtemp(prefix=f"hf-slim-{desc.split()[-1]}-"), fingerprint, temporary=True)
    try:
        done = run.resume(folder, plan)
        steps = run.steps
        bar = tqdm(total=len(steps), initial=done, desc=desc, disable=not show_progress)
        with bar:
            for step in range(done, len(steps)):
                bar.set_postfix_str(f"{steps[step][0]}, read {format_bytes(run.reader.bytes_read)}")
                run.run_step(step)
                if folder is not None:  # a run returning its output keeps the last step's hidden states too
                    last = step + 1 == len(steps) and not run.keeps_output
                    folder.commit(step + 1, steps[step][0], run.collector.acc, run.hidden, last=last)
                bar.update(1)
        result = finish()
    finally:
        run.hidden.close()
        if folder is not None and folder.temporary:
            folder.clear()
    if folder is not None and not folder.temporary and not keep_work_files:
        folder.clear()
    return result


# ---- one run ------------------------------------------------------------------------------------------------------
_LOAD_CHUNK_BYTES = 64 * 2**20  # what one read of a block's tensor may hold at once


class LayerwiseCalibrationError(ValueError):
    """The model's structure cannot be replayed block by block (blocks outside the decoder stack that hf-slim does not
    know, buffers computed inside a block, a forward that does not call each decoder layer once). None of the
    supported families raises it; the message says to load the model and call `collect_statistics(model, ...)`."""


class _Stop(Exception):
    """Raised by the last recorder: the rest of the model's forward (final norm, head) is not needed."""


@dataclass(frozen=True)
class _MemoryPlan:
    weights: int  # the most weight bytes held at once (a block, or the embedding), plus one tensor being read
    work: int  # one batch's activations and copies, and the accumulators
    hidden: int  # the calibration set's hidden states
    budget: int

    @property
    def need(self) -> int:
        return self.weights + self.work

    @property
    def in_memory(self) -> bool:
        return self.need + self.hidden <= self.budget


class _NoStatistics:
    """The collector of a run that only computes hidden states: no hooks, no accumulators."""

    def __init__(self) -> None:
        self.acc: dict[str, torch.Tensor] = {}

    def install_block(self, i: int) -> None:
        pass

    def install_final(self) -> None:
        pass

    def remove(self) -> None:
        pass


class _Run:
    """The meta-device skeleton, the collector, the hidden states and the steps of one layer-by-layer pass.

    With `statistics=False` the run collects nothing and keeps the final norm's output (`hidden`), the model's last
    hidden state; the MTP heads are not run. `attention_mask` (right-padded rows, only then): each batch runs to its
    longest row, with the arguments the model's forward gives that batch's mask.
    """

    def __init__(self, reader: Any, ids: torch.Tensor, dtype: torch.dtype, dev: torch.device, batch_size: int,
                 attention_mask: torch.Tensor | None = None, statistics: bool = True):  # fmt: skip
        from transformers import AutoModelForCausalLM

        from ..anatomy import get_spec

        if attention_mask is not None and statistics:
            raise ValueError("attention_mask: padded rows are for final hidden states, not calibration statistics")
        self.reader, self.ids, self.dtype, self.dev, self.batch_size = reader, ids, dtype, dev, batch_size
        self.mask, self.statistics, self.keeps_output = attention_mask, statistics, not statistics
        self.names = set(reader.names())
        self.source_config = reader.config
        config = copy.deepcopy(reader.config)  # from_config settles attention/experts fields on the config it gets
        self.spec = get_spec(config)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        # GLM-4-MoE / DeepSeek-V3: MTP layers stored after the decoder layers, run as the drafter runs them
        self.trailing = attach_mtp_layers(self.model, self.names, spec=self.spec)
        self._drafter = None
        self.blocks = self.spec.blocks(self.model)
        self.n_dec = sum(1 for b in self.blocks if self.spec.is_decoder_block(b)) - len(self.trailing)
        self.mtp = getattr(self.model, "mtp", None)
        if len(self.blocks) > self.n_dec and self.mtp is None and not self.trailing:
            raise LayerwiseCalibrationError(
                f"{config.model_type}: blocks {self.blocks[self.n_dec:]} run outside the decoder stack in a way "
                "layer-by-layer calibration does not know; load the model and call collect_statistics(model, ...)"
            )
        self._rebuild_buffers()
        if statistics:
            self.collector = _Collector(self.model, self.spec, device=dev)
            self.collector.allocate()
            self.collector.tokens, self.collector.samples = ids.numel(), int(ids.shape[0])
        else:
            self.collector = _NoStatistics()
        self.calls: dict[int, list[tuple[tuple, dict]]] = {}  # batch rows -> per decoder layer (args, kwargs)
        n, length = ids.shape
        self.shape = (int(n), int(length), int(self.model.config.hidden_size))
        self.hidden = HiddenStates(self.shape, dtype)
        #: (name, kind, block index); the statistics index of a block is its place in `blocks`
        self.steps: list[tuple[str, str, int]] = [("embeddings", "embed", -1)]
        self.steps += [(b, "block", i) for i, b in enumerate(self.blocks[: self.n_dec])]
        if _get(self.model, self.spec.modules["final_norm"]) is not None:
            self.steps.append(("final norm", "final", -1))
        # MTP depth k predicts from T - k positions; a depth with none is skipped, as the model's forward does
        mtp = range(self.n_dec, self.n_dec + length - 1) if statistics else ()  # the last hidden state needs none
        self.steps += [(b, "mtp", i) for i, b in enumerate(self.blocks) if i in mtp]
        # (start, stop, length) of each batch: a padded batch stops at its longest row
        spans = [(b0, min(b0 + batch_size, int(n))) for b0 in range(0, int(n), batch_size)]
        self.batches = [(b0, b1, int(length) if attention_mask is None else int(attention_mask[b0:b1].sum(1).max()))
                        for b0, b1 in spans]  # fmt: skip

    # ---- set-up ----------------------------------------------------------------------------------------------------
    def _rebuild_buffers(self) -> None:
        """Buffers that are computed, not stored (the RoPE tables), are rebuilt for real from the config."""
        stored = set(self.model.state_dict())
        owners = sorted({name.rpartition(".")[0] for name, _ in self.model.named_buffers() if name not in stored})
        for path in owners:
            if self.spec.split_name(path + ".x")[0] is not None:
                raise LayerwiseCalibrationError(
                    f"{path}: a block computes buffers at construction, which layer-by-layer calibration cannot "
                    "rebuild; load the model and call collect_statistics(model, ...)"
                )
            old = self.model.get_submodule(path)
            try:
                new = type(old)(config=self.model.config).to(self.dev)
            except TypeError as error:
                raise LayerwiseCalibrationError(
                    f"{path}: cannot rebuild {type(old).__name__} from the config ({error}); load the model and call "
                    "collect_statistics(model, ...)"
                ) from None
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, new)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the work folder."""
        config = {k: v for k, v in self.source_config.to_dict().items()
                  if k not in ("_name_or_path", "transformers_version")}  # fmt: skip
        tensors = sorted(
            (n, [int(d) for d in self.reader.shape(n)], str(_as_dtype(self.reader.dtype(n)))) for n in self.names
        )
        ids = self.ids.contiguous()
        fingerprint = {
            "format": _FORMAT,
            "source config": _sha(json.dumps(config, sort_keys=True, default=str)),
            "source tensors": _sha(json.dumps(tensors)),
            "calibration token ids": _sha(ids.numpy().tobytes() + str(tuple(ids.shape)).encode()),
            "num_samples": self.shape[0],
            "max_length": self.shape[1],
            "batch_size": self.batch_size,
            "dtype": str(self.dtype).replace("torch.", ""),
        }
        if not self.statistics:  # keys a calibration's folder has not: a teacher's work folder is never taken for one
            fingerprint["output"] = "final hidden states"
            mask = b"" if self.mask is None else self.mask.to(torch.uint8).contiguous().numpy().tobytes()
            fingerprint["attention mask"] = _sha(mask)
        return fingerprint

    def memory_plan(self, budget: int, given: Any) -> _MemoryPlan:
        """Estimate host memory; raise when even one block does not fit in `budget`."""
        n, length, hidden = self.shape
        elt = torch.empty((), dtype=self.dtype).element_size()
        rows = min(self.batch_size, n)
        tokens = rows * length
        largest = max((int(self.reader.nbytes(name)) for name in self.names), default=0)
        largest_read = min(largest, _LOAD_CHUNK_BYTES)  # tensors are read in chunks of rows (see _load)
        batch_io = 2 * tokens * hidden * elt
        if self.dev.type == "cpu":
            emb = _nbytes(self.model.get_input_embeddings())
            mtp_shared = 0 if self.mtp is None else _nbytes(self.mtp) - _nbytes(self.mtp.layers)
            # an MTP block runs with the embedding and the predictor's shared fc / norms
            per_block = [_nbytes(self.model.get_submodule(b)) + (emb + mtp_shared if i >= self.n_dec else 0)
                         for i, b in enumerate(self.blocks)]  # fmt: skip
            head = [_nbytes(self.model.get_output_embeddings())] if self.keeps_output else []  # read at the end
            weights = max([emb, *head, *per_block]) + largest_read
            work = tokens * self._bytes_per_token(elt) + self._attention_bytes(rows, length) + batch_io
            work += self._accumulator_bytes() if self.statistics else 0
        else:  # weights, activations and accumulators live on the device; the host stages a tensor and a batch
            weights, work = largest_read, batch_io
        plan = _MemoryPlan(weights=weights, work=work, hidden=n * length * hidden * elt, budget=budget)
        if plan.need > budget:
            shown = f"max_memory={given!r}" if given is not None else f"the available RAM ({format_bytes(budget)})"
            raise ValueError(
                f"{shown} is too little: one block needs about {format_bytes(plan.need)} ({format_bytes(weights)} of "
                f"weights and {format_bytes(work)} of working space at batch_size={self.batch_size}, "
                f"max_length={length}); give at least that, or lower batch_size"
            )
        where = "in memory" if plan.in_memory else "in the work folder"
        logger.info("layerwise calibration: hidden states (%s) %s; one block needs about %s",
                    format_bytes(plan.hidden), where, format_bytes(plan.need))  # fmt: skip
        return plan

    def _bytes_per_token(self, elt: int) -> int:
        # A generous count of what one block keeps alive per token: hidden copies, q/k/v/o, the routed tokens'
        # expert inputs, activations and outputs, dense / shared FFN activations (run dtype), and the float32
        # copies the hooks make (router logits, expert activations and outputs, head outputs).
        c = self.model.config
        hidden, heads = c.hidden_size, getattr(c, "num_attention_heads", 1)
        head_dim = getattr(c, "head_dim", None) or hidden // heads
        top_k = getattr(c, self.spec.field("num_experts_per_tok"), 0) or 0
        experts = width = dense = 0
        for b in self.blocks:
            block = self.model.get_submodule(b)
            ex = _get(block, self.spec.modules["experts"])
            if ex is not None and hasattr(ex, "gate_up_proj"):
                experts, width = max(experts, ex.gate_up_proj.shape[0]), max(width, ex.gate_up_proj.shape[1] // 2)
            for key in ("dense_down", "shared_down"):
                down = _get(block, self.spec.modules[key])
                if down is not None and hasattr(down, "weight"):
                    dense = max(dense, down.weight.shape[1])
        in_dtype = 7 * hidden + 5 * heads * head_dim + top_k * (3 * hidden + 3 * width) + 3 * dense
        in_float = 2 * top_k * width + top_k * hidden + experts + heads * head_dim + hidden
        return elt * in_dtype + 4 * in_float

    def _attention_bytes(self, rows: int, length: int) -> int:
        c = self.model.config
        if getattr(c, "_attn_implementation", None) != "eager":
            return rows * length * length  # a boolean mask at most: sdpa does not keep the scores
        return rows * getattr(c, "num_attention_heads", 1) * length * length * 4 * 2

    def _accumulator_bytes(self) -> int:
        c, L = self.model.config, len(self.blocks)
        floats = 0
        for b in self.blocks[:1] + self.blocks[-1:]:
            ex = _get(self.model.get_submodule(b), self.spec.modules["experts"])
            if ex is not None and hasattr(ex, "gate_up_proj"):
                e, i2, h = ex.gate_up_proj.shape
                floats = max(floats, e * (4 + e + h + i2 // 2))
        return L * (floats + 6 * c.hidden_size + getattr(c, "num_attention_heads", 1) + 64) * 4

    def resume(self, folder: WorkDir | None, plan: _MemoryPlan) -> int:
        """Start the hidden states (in memory or in files) and return the number of steps already done."""
        done = 0
        if folder is not None:
            state = folder.load()
            if state is not None:
                done, acc = state
                self.collector.acc = {k: v.to(self.dev) for k, v in acc.items()}
            folder.check_space(self.hidden.nbytes, done)
        if done < len(self.steps) or self.keeps_output:
            path = folder.hidden_path(done) if done > 0 else None
            self.hidden.start(None if plan.in_memory else folder, path)
        return done

    # ---- steps -----------------------------------------------------------------------------------------------------
    def run_step(self, step: int) -> None:
        """Run step `step`; every step but the last leaves its hidden states for the next one (the last too when
        the run keeps its output)."""
        _, kind, index = self.steps[step]
        self.hidden.step = step + 1
        writes = step + 1 < len(self.steps) or self.keeps_output
        if kind == "embed":
            self._embed()
        elif kind == "block":
            self._block(index, writes)
        elif kind == "final":
            self._final(writes)
        elif self.trailing:
            self._trailing_mtp_block(index, index - self.n_dec, writes)
        else:
            self._mtp_block(index, index - self.n_dec + 1, writes)

    def _mask(self, b0: int, b1: int, length: int) -> torch.Tensor | None:
        return None if self.mask is None else self.mask[b0:b1, :length].to(self.dev)

    def _embed(self) -> None:
        embedding = self.model.get_input_embeddings()
        self._load(embedding, _path_of(self.model, embedding))
        try:
            self.hidden.begin()
            for b0, b1, length in self.batches:
                ids = self.ids[b0:b1, :length].to(self.dev)
                first, calls = self._decoder_calls(b1 - b0, length, ids, self._mask(b0, b1, length))
                if self.mask is None:
                    self.calls.setdefault(b1 - b0, calls)
                self.hidden.write(b0, b1, first)
            self.hidden.end()
        finally:
            self._free(embedding)

    def _layer_args(self, b0: int, b1: int, length: int) -> list[tuple[tuple, dict]]:
        """What the model's forward passes each decoder layer for the batch `b0:b1`. Packed batches of a size share
        them (recorded once); a padded batch's follow its mask and are recorded again for each block rather than
        kept (a `[rows, 1, T, T]` mask per batch could outgrow the hidden states)."""
        if self.mask is not None:
            return self._decoder_calls(b1 - b0, length, attention_mask=self._mask(b0, b1, length))[1]
        if b1 - b0 not in self.calls:
            self.calls[b1 - b0] = self._decoder_calls(b1 - b0, length)[1]
        return self.calls[b1 - b0]

    def _decoder_calls(self, rows: int, length: int, input_ids: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, list]:  # fmt: skip
        """Run the model's own forward with each decoder layer replaced by a recorder: returns the first layer's
        input and what the forward passes each layer (`(args, kwargs)` per layer). Without `input_ids` it runs on
        zero embeddings: the arguments depend only on the batch's shape and attention mask."""
        layers = [self.model.get_submodule(b) for b in self.blocks[: self.n_dec]]
        calls: dict[int, tuple[tuple, dict]] = {}
        first: list[torch.Tensor] = []

        def recorder(i: int):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs.pop("hidden_states")
                calls[i] = (args[1:], kwargs)
                if i == 0:
                    first.append(hidden)
                if i == len(layers) - 1:
                    raise _Stop
                return hidden

            return forward

        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        if input_ids is None:
            inputs = {"inputs_embeds": torch.zeros(rows, length, self.shape[2], dtype=self.dtype, device=self.dev)}
        else:
            inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        try:
            self.model(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            for layer in layers:
                del layer.forward
        if len(calls) != len(layers):
            raise LayerwiseCalibrationError(
                f"{type(self.model).__name__}'s forward called {len(calls)} of its {len(layers)} decoder layers; "
                "layer-by-layer calibration needs each called once; load the model and call "
                "collect_statistics(model, ...)"
            )
        return (first[0] if first else None), [calls[i] for i in range(len(layers))]

    def _block(self, i: int, writes: bool) -> None:
        if self.mask is None:  # a resumed run has not recorded them; before the hooks, which would count
            for b0, b1, length in self.batches:
                self._layer_args(b0, b1, length)
        block = self.model.get_submodule(self.blocks[i])
        self._load(block, self.blocks[i])
        try:
            self.collector.install_block(i)  # no hooks with a mask (no statistics)
            self.hidden.begin(writes)
            for b0, b1, length in self.batches:
                args, kwargs = self._layer_args(b0, b1, length)[i]
                out = block(self.hidden.read(b0, b1, length, self.dev), *args, **kwargs)
                self.hidden.write(b0, b1, out[0] if isinstance(out, tuple) else out)
            self.hidden.end()
        finally:
            self.collector.remove()
            self._free(block)

    def _final(self, writes: bool) -> None:
        final = _get(self.model, self.spec.modules["final_norm"])
        self._load(final, self.spec.modules["final_norm"])
        try:
            self.collector.install_final()
            self.hidden.begin(writes)  # the MTP heads start from the normed last hidden state
            for b0, b1, length in self.batches:
                self.hidden.write(b0, b1, final(self.hidden.read(b0, b1, length, self.dev)))
            self.hidden.end()
        finally:
            self.collector.remove()
            self._free(final)

    def _mtp_block(self, i: int, depth: int, writes: bool) -> None:
        """MTP depth `depth` as `SlimMoeForCausalLM.forward(return_mtp=True)` runs it: the predictor's own forward
        with only this depth's block, fed the previous depth's output and the embeddings shifted by `depth - 1`."""
        length = self.shape[1] - depth  # positions this depth computes
        block = self.model.get_submodule(self.blocks[i])
        embedding = self.model.get_input_embeddings()
        mtp_path = _path_of(self.model, self.mtp)
        shared = [(name, child) for name, child in self.mtp.named_children() if child is not self.mtp.layers]
        loaded = [(embedding, _path_of(self.model, embedding)), (block, self.blocks[i])]
        loaded += [(child, f"{mtp_path}.{name}") for name, child in shared]
        outputs: list[torch.Tensor] = []
        layers = self.mtp.layers
        handle = block.register_forward_hook(
            lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            for module, path in loaded:
                self._load(module, path)
            self.mtp.layers = torch.nn.ModuleList([block])
            self.collector.install_block(i)
            self.hidden.begin(writes)
            for b0, b1, _ in self.batches:  # packed: every batch is T long
                inputs_embeds = embedding(self.ids[b0:b1].to(self.dev))
                previous = self.hidden.read(b0, b1, length + 1, self.dev)
                positions = torch.arange(length + 1, device=self.dev).unsqueeze(0)
                self.mtp(self.model.config, self.model.model.rotary_emb, previous, inputs_embeds[:, depth - 1 :],
                         None, positions)  # fmt: skip
                self.hidden.write(b0, b1, outputs.pop())
            self.hidden.end()
        finally:
            handle.remove()
            self.collector.remove()
            self.mtp.layers = layers
            for module, _ in loaded:
                self._free(module)

    def _trailing_mtp_block(self, i: int, k: int, writes: bool) -> None:
        """MTP depth `k + 1` of a family storing MTP layers after its decoder layers, as the in-memory pass runs it
        (transformers' drafter, `run_mtp_depth`): fed depth `k`'s output (the normed last hidden state for the first
        depth) and the embeddings of the tokens `k + 1` positions on."""
        if self._drafter is None:  # after `_rebuild_buffers`: the drafter shares the rebuilt rotary embedding
            self._drafter = mtp_drafter(self.model, [self.model.get_submodule(b) for b in self.trailing])
        block = self.model.get_submodule(self.blocks[i])
        embedding = self.model.get_input_embeddings()
        loaded = [(embedding, _path_of(self.model, embedding)), (block, self.blocks[i])]
        try:
            for module, path in loaded:
                self._load(module, path)
            self.collector.install_block(i)
            self.hidden.begin(writes)
            for b0, b1, _ in self.batches:  # packed: every batch is T long
                previous = self.hidden.read(b0, b1, self.shape[1] - k - 1, self.dev)
                out = run_mtp_depth(self._drafter, k, self.ids[b0:b1].to(self.dev), previous)
                self.hidden.write(b0, b1, out)
            self.hidden.end()
        finally:
            self.collector.remove()
            for module, _ in loaded:
                self._free(module)

    # ---- weights ---------------------------------------------------------------------------------------------------
    def _load(self, module: torch.nn.Module, prefix: str) -> None:
        """Materialise `module` on the device in the run dtype from the checkpoint's tensors under `prefix`."""
        module.to_empty(device=self.dev)
        for key, target in module.state_dict(keep_vars=True).items():
            name = f"{prefix}.{key}" if prefix else key
            if name not in self.names:
                raise ValueError(
                    f"{name}: not in the checkpoint {_where(self.reader)}, but its config "
                    f"(model_type={self.model.config.model_type!r}) builds it"
                )
            shape = tuple(self.reader.shape(name))
            if shape != tuple(target.shape):
                raise ValueError(
                    f"{name}: the checkpoint {_where(self.reader)} holds shape {shape}, its config "
                    f"builds {tuple(target.shape)}"
                )
            # Read in row chunks straight into the parameter: a fused expert tensor (0.8 GB in Qwen3-30B-A3B) never
            # sits in memory twice, so a block costs its own bytes plus one chunk.
            rows = max(1, _LOAD_CHUNK_BYTES // max(1, self.reader.nbytes(name) // max(1, shape[0]))) if shape else 1
            if not shape or rows >= shape[0]:
                target.data.copy_(self.reader.read(name))  # casts to the run dtype
                continue
            rest = [None] * (len(shape) - 1)
            for start in range(0, shape[0], rows):
                stop = min(start + rows, shape[0])
                target.data[start:stop].copy_(self.reader.read(name, [[(start, stop)], *rest]))

    @staticmethod
    def _free(module: torch.nn.Module) -> None:
        module.to_empty(device="meta")


# ---- small helpers ------------------------------------------------------------------------------------------------
def _open(source: Any) -> tuple[Any, bool]:
    """A reader for `source`, and whether this call owns (closes) it."""
    if all(hasattr(source, attr) for attr in ("config", "names", "read", "block_names")):
        return source, False
    if isinstance(source, (str, os.PathLike)):
        from ..checkpoints import open_checkpoint

        return open_checkpoint(os.fspath(source)), True
    raise TypeError(
        f"source: expected a checkpoint folder, a Hub id or a CheckpointReader, got a {type(source).__name__}"
    )


def _device(device: Any) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: give 'cpu', 'cuda', 'cuda:1', ... or a torch.device") from None


def _as_dtype(value: Any) -> Any:
    if isinstance(value, str):
        return _DTYPES.get(value.lower().replace("torch.", ""), value)
    return value


def _run_dtype(reader: Any, dtype: Any) -> torch.dtype:
    if dtype is None or dtype == "auto":  # the checkpoint's own: the floating dtype holding the most bytes
        by_dtype: dict[torch.dtype, int] = {}
        for name in reader.names():
            d = _as_dtype(reader.dtype(name))
            if isinstance(d, torch.dtype) and d.is_floating_point:
                by_dtype[d] = by_dtype.get(d, 0) + int(reader.nbytes(name))
        return max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32
    d = _as_dtype(dtype)
    if not (isinstance(d, torch.dtype) and d.is_floating_point):
        raise ValueError(
            f"dtype={dtype!r}: give torch.bfloat16, torch.float16 or torch.float32 (or a name such as 'bfloat16'), "
            "or None for the checkpoint's own dtype"
        )
    return d


def _parse_memory(value: Any) -> int:
    """Bytes from an int or a string like `"20GB"` (10^9) or `"16GiB"` (2^30); `None`: the available RAM."""
    if value is None:
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", value.lower())
        if m and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    raise ValueError(f"max_memory={value!r}: give a positive number of bytes or a string like '20GB' or '16GiB'")


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _path_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _where(reader: Any) -> str:
    folder = getattr(reader, "folder", None)
    return repr(os.fspath(folder)) if folder is not None else f"({type(reader).__name__})"


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()
