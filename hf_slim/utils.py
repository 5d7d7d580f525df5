"""Small shared helpers: atomic folder writes, parameter counts and byte sizes."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target` that replaces `target` only if the block finishes.

    Nothing half-written is left at `target`: on error the temporary folder is removed and `target` is untouched.
    With `overwrite`, the old folder is moved aside, the new one renamed into place, and the old one deleted; if the
    rename fails the old folder is put back. Temporaries of a run that was killed (SIGKILL, power loss) are removed
    by the next write to the same target, and an old folder a killed swap left aside is restored; both are logged.
    The folder gets the permissions `os.makedirs` gives (as `save_pretrained`'s), not `mkdtemp`'s 0700.

    Args:
        target: The folder to create.
        overwrite: Replace an existing non-empty `target`; otherwise that raises `FileExistsError`.
    """
    target = Path(target).resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"Output folder {target} is a file; give a folder path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"Output folder {target} exists and is not empty; pass overwrite=True to replace it.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        backup = None
        if target.exists():
            backup = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(backup)
        try:
            tmp.rename(target)
        except BaseException:
            if backup is not None:  # the old folder goes back where it was
                backup.rename(target)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _clean_stale(target: Path) -> None:
    """Remove the temporaries of killed writes to `target`, and restore an old folder a killed swap left aside."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)")
    for path in sorted(target.parent.iterdir()):
        match = pattern.match(path.name)
        if match is None or int(match.group(2)) == os.getpid() or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not target.exists():
            logger.warning("Restoring %s from %s, left aside by a write that was killed while replacing it.", target, path)
            path.rename(target)
        else:
            logger.warning("Removing %s, left by a write to %s that was killed.", path, target)
            shutil.rmtree(path, ignore_errors=True)


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
