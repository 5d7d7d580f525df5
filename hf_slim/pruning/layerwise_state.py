"""The state of a layer-by-layer calibration between blocks: the calibration set's hidden states (in memory or in
files) and the work folder a killed run resumes from.

Every file is written under a temporary name and renamed (`os.replace`), and `progress.json` is renamed last: it is
the commit point, so a run killed at any moment leaves the files of its last finished step intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch

from ..utils import format_bytes

__all__ = ["HiddenStates", "WorkDir"]

_PROGRESS = "progress.json"
_WORK_FILE = re.compile(r"^(hidden-\d+\.bin|stats-\d+\.safetensors|progress\.json)(\.tmp)?$")


# ---- hidden states between blocks ---------------------------------------------------------------------------------
class HiddenStates:
    """`[N, T, H]` hidden states of the calibration set, in memory or in the work folder's files.

    In memory, a block's output overwrites its input batch by batch (a batch is read before it is written). On disk,
    each step reads the last finished step's file and writes the next one under a temporary name, renamed when the
    step ends, so a killed run always finds one complete file. MTP depth k uses the first `T - k` positions.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype):
        self.shape, self.dtype = shape, dtype
        self.numel = shape[0] * shape[1] * shape[2]
        self.nbytes = self.numel * torch.empty((), dtype=dtype).element_size()
        self.folder: WorkDir | None = None
        self.data: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        self.step = 0  # the step being run, counted from 1: its file is `hidden_path(step)`

    def start(self, folder: WorkDir | None, path: str | None) -> None:
        """`folder`: keep them in files there (else in memory); `path`: a finished step's file to continue from."""
        self.folder = folder
        if path is not None:
            if os.path.getsize(path) < self.nbytes:
                raise ValueError(
                    f"{path}: holds {os.path.getsize(path)} bytes, the hidden states take {self.nbytes}; delete "
                    f"{os.path.join(os.path.dirname(path), _PROGRESS)} to start over"
                )
            mapped = self._map(path, shared=False)
            self.data = mapped if folder is not None else mapped.clone()
        elif folder is None:
            self.data = torch.empty(self.shape, dtype=self.dtype)

    def _map(self, path: str, *, shared: bool) -> torch.Tensor:
        return torch.from_file(path, shared=shared, size=self.numel, dtype=self.dtype).view(self.shape)

    def begin(self, writes: bool = True) -> None:
        if not writes:
            self.out = None
        elif self.folder is None:
            self.out = self.data
        else:
            tmp = self.folder.hidden_path(self.step) + ".tmp"
            if os.path.exists(tmp):  # left by a killed run
                os.remove(tmp)
            self.out = self._map(tmp, shared=True)

    def read(self, b0: int, b1: int, length: int, dev: torch.device) -> torch.Tensor:
        return self.data[b0:b1, :length].to(dev).contiguous()

    def write(self, b0: int, b1: int, y: torch.Tensor) -> None:
        if self.out is not None:
            self.out[b0:b1, : y.shape[1]].copy_(y)

    def end(self) -> None:
        if self.folder is None or self.out is None:
            return
        self.out = None  # unmaps the file
        path = self.folder.hidden_path(self.step)
        _fsync(path + ".tmp")
        os.replace(path + ".tmp", path)
        self.data = self._map(path, shared=False)

    def dump(self, path: str) -> None:
        """Write the in-memory states to `path` (temporary name, then rename); on disk they are there already."""
        if self.folder is not None:
            return
        tmp = path + ".tmp"
        if os.path.exists(tmp):
            os.remove(tmp)
        out = torch.from_file(tmp, shared=True, size=self.numel, dtype=self.dtype)
        out.copy_(self.data.reshape(-1))
        del out
        _fsync(tmp)
        os.replace(tmp, path)

    def close(self) -> None:
        self.data = self.out = None


# ---- the work folder ----------------------------------------------------------------------------------------------
class WorkDir:
    """Files of one run: `hidden-<done>.bin`, `stats-<done>.safetensors` and `progress.json`, the commit point."""

    def __init__(self, path: str, fingerprint: dict[str, Any], *, temporary: bool):
        self.path, self.fingerprint, self.temporary = path, fingerprint, temporary
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"work_dir={path!r}: is a file; give a folder (it is created when missing)")
        os.makedirs(path, exist_ok=True)

    def hidden_path(self, done: int) -> str:
        return os.path.join(self.path, f"hidden-{done:05d}.bin")

    def stats_path(self, done: int) -> str:
        return os.path.join(self.path, f"stats-{done:05d}.safetensors")

    def load(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The last commit of a run with the same fingerprint, or `None` for a fresh folder."""
        from safetensors.torch import load_file

        progress = os.path.join(self.path, _PROGRESS)
        if self.temporary or not os.path.exists(progress):
            return None
        with open(progress) as f:
            saved = json.load(f)
        theirs = saved.get("fingerprint", {})
        differ = [k for k in self.fingerprint if theirs.get(k) != self.fingerprint[k]]
        if differ:
            shown = ", ".join(
                k if k.startswith(("source", "calibration")) else f"{k} ({theirs.get(k)!r} there, {mine!r} now)"
                for k, mine in ((k, self.fingerprint[k]) for k in differ)
            )
            raise ValueError(
                f"work_dir={self.path!r}: holds the calibration of different inputs ({shown}); pass "
                f"another work_dir, or delete {progress} to start over in this one"
            )
        done = int(saved["done"])
        needed = [self.stats_path(done)] + ([self.hidden_path(done)] if saved.get("hidden") else [])
        missing = [p for p in needed if not os.path.exists(p)]
        if missing:
            raise ValueError(
                f"work_dir={self.path!r}: {_PROGRESS} records {done} finished steps but {missing[0]} is missing; "
                f"delete {progress} to start over"
            )
        return done, load_file(self.stats_path(done))

    def check_space(self, nbytes: int, done: int) -> None:
        have = nbytes if done and os.path.exists(self.hidden_path(done)) else 0
        free = shutil.disk_usage(self.path).free
        if free + have < 2 * nbytes:
            raise ValueError(
                f"work_dir={self.path!r}: the hidden states need about {format_bytes(2 * nbytes - have)} free there, and "
                f"{format_bytes(free)} is free; give a work_dir on a larger disk or calibrate fewer tokens"
            )

    def commit(self, done: int, name: str, acc: dict[str, torch.Tensor], hidden: HiddenStates, *, last: bool) -> None:
        """After step `done - 1` (`name`): its hidden states (unless it was the last), the accumulators, then the
        progress file."""
        from safetensors.torch import save_file

        if not last:
            hidden.dump(self.hidden_path(done))
        if not self.temporary:
            tmp = self.stats_path(done) + ".tmp"
            save_file({k: v.detach().cpu().contiguous() for k, v in acc.items()}, tmp)
            os.replace(tmp, self.stats_path(done))
            progress = {"fingerprint": self.fingerprint, "done": done, "finished": name, "hidden": not last}
            _write_json(os.path.join(self.path, _PROGRESS), progress)
        for name in os.listdir(self.path):  # the previous step's files
            m = re.match(r"^(?:hidden|stats)-(\d+)\.(?:bin|safetensors)$", name)
            if m and int(m.group(1)) != done:
                os.remove(os.path.join(self.path, name))

    def clear(self) -> None:
        """Remove this run's files (and the folder when nothing else is in it)."""
        if not os.path.isdir(self.path):
            return
        for name in os.listdir(self.path):
            if _WORK_FILE.match(name):
                os.remove(os.path.join(self.path, name))
        if not os.listdir(self.path):
            os.rmdir(self.path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
