"""Small shared helpers: atomic folder writes, parameter counts and byte sizes."""

from __future__ import annotations

import contextlib
import os
import re
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


# Decimal units as transformers / huggingface_hub parse `max_shard_size` ("5GB" = 5 * 10**9), binary ones as well.
_SIZE_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(value: int | str, what: str = "size") -> int:
    """A byte count from an int or a string such as `"5GB"` (decimal, as `save_pretrained(max_shard_size=...)`
    reads it), `"500MB"` or `"2GiB"`.

    Args:
        value: the size.
        what: the argument's name, for the error message.

    Raises:
        `ValueError`: `value` is not a positive size.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m is not None and m.group(2).upper() in _SIZE_UNITS:
            size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
            if size > 0:
                return size
    raise ValueError(
        f"{what}={value!r} is not a size; give a positive number of bytes or a string such as '5GB', '500MB' or "
        f"'2GiB'."
    )


def format_bytes(n: int) -> str:
    """`n` bytes in decimal units, as [`parse_size`] reads them (`"20GB"` is 20 * 10^9)."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
