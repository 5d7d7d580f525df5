"""Small shared helpers: atomic folder writes and parameter counts."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target` that replaces `target` only if the block finishes.

    Nothing half-written is left at `target`: on error the temporary folder is removed and `target` is untouched.

    Args:
        target: The folder to create.
        overwrite: Replace an existing non-empty `target`; otherwise that raises `FileExistsError`.
    """
    target = Path(target).resolve()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"Output folder {target} exists and is not empty; pass overwrite=True to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        backup = None
        if target.exists():
            backup = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(backup)
        tmp.rename(target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Count total parameters and parameters active per token.

    Fused routed experts (3D `gate_up_proj`/`down_proj`) count `num_experts_per_tok / num_experts` of their size as
    active; MTP heads (`mtp.*`) are counted in `total` but not in `active` (they are not run when decoding).
    Tied weights are counted once.

    Returns:
        `{"total": ..., "active": ..., "experts": ..., "mtp": ...}`
    """
    config = getattr(model, "config", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    total = active = experts = mtp = 0
    for name, param in model.named_parameters():  # named_parameters() already skips tied duplicates
        n = param.numel()
        total += n
        if name.startswith("mtp.") or ".mtp." in name:
            mtp += n
            continue
        if param.dim() == 3 and name.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj") and top_k:
            experts += n
            active += n * top_k // param.shape[0]
        else:
            active += n
    return {"total": total, "active": active, "experts": experts, "mtp": mtp}
