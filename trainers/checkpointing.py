"""What the distillation trainer leaves on disk: training arguments as JSON instead of a pickle, and resuming from
the latest checkpoint that was written to the end."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["latest_complete_checkpoint", "write_training_args_json"]

logger = logging.getLogger(__name__)

PICKLED_ARGS = "training_args.bin"  # what transformers' Trainer writes with torch.save
ARGS_JSON = "training_args.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "pytorch_model_fsdp_0")  # fmt: skip


def write_training_args_json(args: Any, output_dir: str | os.PathLike) -> None:
    """Replace the pickled `training_args.bin` the Trainer wrote in `output_dir` with `training_args.json`
    (`TrainingArguments.to_json_string()`): a model folder holds no pickle, and the settings stay readable."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)  # under FSDP's sharded state dict, save_model may have written nothing
    tmp = folder / f"{ARGS_JSON}.tmp-{os.getpid()}"
    tmp.write_text(args.to_json_string())
    os.replace(tmp, folder / ARGS_JSON)
    (folder / PICKLED_ARGS).unlink(missing_ok=True)


def _incomplete_reason(folder: Path) -> str | None:
    """Why `folder` is not a checkpoint to resume from, or None. The Trainer writes `trainer_state.json` last."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "it has no trainer_state.json (the Trainer writes it last)"
    try:
        json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "its trainer_state.json is cut short"
    if not any((folder / name).exists() for name in _WEIGHTS):
        return "it holds no model weights"
    return None


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the largest N that was written to the end, skipping (with a
    warning each) those a killed save left incomplete; None when there is none.

    `Trainer.train(resume_from_checkpoint=True)` takes the largest N whatever it holds, and then fails on the
    missing `trainer_state.json` of a checkpoint whose save was interrupted.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), path) for path in folder.iterdir() if (m := _CHECKPOINT.match(path.name)) and path.is_dir()),
        reverse=True,
    )
    for _, path in found:
        reason = _incomplete_reason(path)
        if reason is None:
            return str(path)
        logger.warning("Not resuming from %s: %s; trying the checkpoint before it.", path, reason)
    return None
