"""A teacher too big to hold in memory, run one block at a time: its final hidden states and output head.

[`layerwise_final_hidden`] drives the layer-by-layer pass of the pruning calibration (`hf_slim.pruning.layerwise`)
without statistics: the model is built on the meta device from the checkpoint, one decoder block at a time is read,
run on every batch and freed, and the final norm's output is kept. The caller projects it with the returned head
(`write_teacher_logits` does, chunk by chunk), so neither the model nor its logits are ever whole in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..pruning.layerwise import _device, _drive, _open, _parse_memory, _path_of, _Run, _run_dtype

__all__ = ["LayerwiseTeacher", "LayerwiseTeacherOutput", "layerwise_final_hidden"]


@dataclass
class LayerwiseTeacherOutput:
    """What [`layerwise_final_hidden`] returns.

    Attributes:
        last_hidden_state (`torch.Tensor` of shape `[N, T, hidden_size]`): the final norm's output, what
            `model.get_decoder()(input_ids, attention_mask).last_hidden_state` gives, in the run dtype, in host
            memory; when it spilled, mapped from its work file (removed from the folder, its disk space freed with
            the tensor). Padded positions hold zeros.
        lm_head_weight (`torch.Tensor` of shape `[vocab_size, hidden_size]`): the output head's weight read from the
            checkpoint (the input embeddings when they are tied), in the run dtype, on `device`.
        lm_head_bias (`torch.Tensor` of shape `[vocab_size]`, *optional*): the head's bias, `None` for a head
            without one.
    """

    last_hidden_state: torch.Tensor
    lm_head_weight: torch.Tensor
    lm_head_bias: torch.Tensor | None = None


@torch.no_grad()
def layerwise_final_hidden(
    source: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    dtype: Any = None,
    device: Any = "cpu",
    batch_size: int = 8,
    max_memory: int | str | None = None,
    work_dir: str | os.PathLike | None = None,
    keep_work_files: bool = False,
    show_progress: bool = True,
    trust_remote_code: bool = False,
) -> LayerwiseTeacherOutput:
    """The final hidden states of a checkpoint's model on `input_ids`, holding one decoder block in memory at a time.

    Each batch of `batch_size` rows runs with the arguments the model's own forward gives its decoder layers for that
    batch's `attention_mask` (causal mask with padding, RoPE, position ids), up to the batch's longest row: a batch
    gives the same numbers at its real positions as the in-memory `model.get_decoder()(...)` on that batch padded to
    its own longest row (as `write_teacher_logits` pads it). Rows of similar lengths in a batch save work.

    Args:
        source (`str`, `os.PathLike` or `CheckpointReader`): a safetensors checkpoint folder, a Hub id, or an open
            reader (`hf_slim.checkpoints.open_checkpoint`, `StateDictReader`); a reader passed in is not closed.
        input_ids (`torch.LongTensor` of shape `[N, T]`): token ids, right-padded.
        attention_mask (`torch.Tensor` of shape `[N, T]`, *optional*): 1 for real tokens, then 0 for padding (right
            padding; every row holds at least one token). `None`: every position is real.
        dtype (`torch.dtype` or `str`, *optional*): the dtype blocks run in; `None` keeps the checkpoint's own (a
            bf16 checkpoint runs in bf16).
        device (`str` or `torch.device`, defaults to `"cpu"`): where blocks run and the head is returned. The hidden
            states stay in host memory (or the work folder) and go to the device one batch at a time.
        batch_size (`int`, defaults to 8): rows per block call.
        max_memory (`int` or `str`, *optional*): host memory to use, in bytes or as `"20GB"` / `"16GiB"`; defaults
            to the available RAM. The hidden states of the `N` rows go to a file in `work_dir` (or a temporary
            folder) when they do not fit beside the largest block and its working space.
        work_dir (`str` or `os.PathLike`, *optional*): folder for spilled hidden states and for resuming: a new call
            with the same folder and inputs continues after the last finished block.
        keep_work_files (`bool`, defaults to `False`): keep the work files after success (a new call then returns at
            once); by default they are removed.
        show_progress (`bool`, defaults to `True`): show a tqdm bar over the blocks.
        trust_remote_code (`bool`, defaults to `False`): accepted for symmetry with `from_pretrained`; no remote code
            runs: the pass builds the transformers (or hf-slim) implementation of the families hf-slim supports.

    Returns:
        [`LayerwiseTeacherOutput`]: the final hidden states and the output head.

    Raises:
        `ValueError`: bad shapes or a mask that is not right padding, an unknown dtype or device, a `max_memory`
            below what one block needs, a checkpoint missing a tensor or holding another shape, or a `work_dir`
            holding a run with other inputs.
        [`~hf_slim.pruning.LayerwiseCalibrationError`] (a `ValueError`): a model this pass cannot replay block by
            block (none of the supported families).
    """
    del trust_remote_code  # see the docstring: nothing to trust
    ids, mask = _check_inputs(input_ids, attention_mask)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")
    dev = _device(device)
    budget = _parse_memory(max_memory)
    reader, owned = _open(source)
    try:
        run = _Run(reader, ids, _run_dtype(reader, dtype), dev, batch_size, attention_mask=mask, statistics=False)
        # seen on the fresh skeleton: materialising a module on a device unties a shared parameter
        tied = run.model.get_output_embeddings().weight is run.model.get_input_embeddings().weight

        def finish() -> LayerwiseTeacherOutput:
            hidden = run.hidden.data
            if mask is not None:
                _zero_padding(hidden, mask)
            weight, bias = _output_head(run, tied)
            return LayerwiseTeacherOutput(hidden, weight, bias)

        return _drive(run, budget, max_memory, work_dir, keep_work_files, show_progress, "layerwise teacher", finish)
    finally:
        if owned:
            reader.close()


def _check_inputs(input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`input_ids` as a CPU int64 tensor and the mask on the CPU, checked: right padding only."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.numel() == 0:
        shown = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a non-empty [N, T] tensor of token ids, got {shown}")
    if input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"input_ids: expected integer token ids, got {input_ids.dtype}")
    ids = input_ids.detach().cpu().long()
    if attention_mask is None:
        return ids, None
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(ids.shape):
        shown = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask: expected the shape of input_ids {tuple(ids.shape)}, got {shown}")
    mask = attention_mask.detach().cpu()
    values = mask.long()
    if ((values != 0) & (values != 1)).any():
        raise ValueError("attention_mask: expected 1 for real tokens and 0 for padding")
    if (values[:, 1:] > values[:, :-1]).any():
        raise ValueError("attention_mask: expected right padding (each row's real tokens first, then its padding)")
    if (values[:, 0] == 0).any():
        raise ValueError("attention_mask: every row needs at least one real token")
    return ids, mask


def _zero_padding(hidden: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the positions past each row's length: in memory they were never written. A spilled file's are zeros
    already, and the check keeps its pages from being copied into memory."""
    for row, length in enumerate(mask.long().sum(1).tolist()):
        tail = hidden[row, length:]
        if tail.numel() and tail.any():
            tail.zero_()


def _output_head(run: _Run, tied: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output head's weight (the embeddings' when `tied`) and bias, read from the checkpoint in the run dtype."""
    model = run.model
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    head_path = _path_of(model, head)
    # Read into the skeleton's module (shape-checked, in row chunks), then let it go: the detached tensors keep it.
    module, path = (embedding, _path_of(model, embedding)) if tied else (head, head_path)
    run._load(module, path)
    try:
        weight = module.weight.detach()
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        if tied and getattr(head, "bias", None) is not None:
            bias = run.reader.read(f"{head_path}.bias").to(device=run.dev, dtype=run.dtype)
    finally:
        run._free(module)
    return weight, bias


class LayerwiseTeacher:
    """A teacher for [`write_teacher_logits`] that is read from its checkpoint one decoder block at a time.

    Each pass over the checkpoint runs `rows_per_pass` rows (in batches of the writer's `batch_size`, each padded to
    its own longest row, as the in-memory writer pads them, so the numbers are the same), so the checkpoint is read
    once per `rows_per_pass` rows: more rows per pass read it less often and hold more hidden states
    (`rows × length × hidden` in the run dtype; they spill to a temporary file beyond `max_memory`).

    Args:
        source (`str` or `os.PathLike`): A safetensors checkpoint folder or a Hub id.
        dtype (`torch.dtype`, *optional*): Run dtype; `None` keeps the checkpoint's.
        device (`str`, defaults to `"cpu"`): Where the blocks run.
        rows_per_pass (`int`, defaults to 256): Rows per pass over the checkpoint (rounded up to a multiple of the
            writer's `batch_size`).
        max_memory (`int` or `str`, *optional*): Host memory for the hidden states (see [`layerwise_final_hidden`]).
        show_progress (`bool`, defaults to `False`): A progress bar over the blocks of each pass.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        dtype: Any = None,
        device: Any = "cpu",
        rows_per_pass: int = 256,
        max_memory: int | str | None = None,
        show_progress: bool = False,
    ):
        if isinstance(rows_per_pass, bool) or not isinstance(rows_per_pass, int) or rows_per_pass < 1:
            raise ValueError(f"rows_per_pass={rows_per_pass!r}: must be an int >= 1")
        reader, owned = _open(source)
        try:
            self.vocab_size = int(reader.config.vocab_size)
        finally:
            if owned:
                reader.close()
        self.source, self.name = source, str(source)
        self.options = {"dtype": dtype, "device": device, "max_memory": max_memory, "show_progress": show_progress}
        self._rows = rows_per_pass
        self.head_weight: torch.Tensor | None = None
        self.head_bias: torch.Tensor | None = None

    def rows_per_pass(self, batch_size: int) -> int:
        return -(-self._rows // batch_size) * batch_size

    def final_hidden(self, ids: torch.Tensor, mask: torch.Tensor, batch_size: int) -> torch.Tensor:
        out = layerwise_final_hidden(self.source, ids, mask, batch_size=batch_size, **self.options)
        self.head_weight, self.head_bias = out.lm_head_weight, out.lm_head_bias
        return out.last_hidden_state
