"""`hf_slim.utils.atomic_directory`, which every output folder of hf-slim is written through (prune, slice, convert,
save_for_hub, the distill final folder): killed writes, a full disk, a failed swap, permissions."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_slim.utils import atomic_directory


def _write(target: Path, text: str, overwrite: bool = False) -> None:
    with atomic_directory(target, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(text)


def _killed_write(target: Path, during: str) -> None:
    """A subprocess that SIGKILLs itself inside `atomic_directory` (`during`: the block, or the swap after the old
    folder was moved aside)."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from hf_slim.utils import atomic_directory
        if {during!r} == "swap":
            real = Path.rename
            def rename(self, new):
                real(self, new)
                if ".old-" in str(new):  # the old folder is aside, the new one not yet in place
                    os.kill(os.getpid(), signal.SIGKILL)
            Path.rename = rename
        with atomic_directory({str(target)!r}, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
            if {during!r} == "block":
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_killed_write_leaves_the_target_and_its_temporary_goes_with_the_next_write(tmp_path, caplog):
    target = tmp_path / "out"
    _write(target, "old")
    _killed_write(target, "block")
    assert (target / "config.json").read_text() == "old"
    assert [name.split("-")[0] for name in _hidden(tmp_path)] == [".out.tmp"]  # what the kill left
    with caplog.at_level(logging.WARNING, logger="hf_slim.utils"):
        _write(target, "newer", overwrite=True)
    assert (target / "config.json").read_text() == "newer" and _hidden(tmp_path) == []
    assert "left by a write to" in caplog.text and "was killed" in caplog.text


def test_a_write_killed_during_the_swap_gets_the_old_folder_back(tmp_path, caplog):
    target = tmp_path / "out"
    _write(target, "old")
    _killed_write(target, "swap")
    assert not target.exists()  # the kill came between the two renames
    with caplog.at_level(logging.WARNING, logger="hf_slim.utils"), pytest.raises(FileExistsError):
        _write(target, "newer")  # the old folder is restored first, so a write without overwrite is refused
    assert (target / "config.json").read_text() == "old" and _hidden(tmp_path) == []
    assert "Restoring" in caplog.text


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    _write(target, "old")
    real = Path.rename

    def rename(self, new):
        if ".tmp-" in self.name:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(self, new)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="cross-device"):
        _write(target, "new", overwrite=True)
    assert (target / "config.json").read_text() == "old" and _hidden(tmp_path) == []


def test_a_full_disk_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    _write(target, "old")
    with pytest.raises(OSError) as error, atomic_directory(target, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert error.value.errno == errno.ENOSPC
    assert (target / "config.json").read_text() == "old" and not (target / "model.safetensors").exists()
    assert _hidden(tmp_path) == []


def test_permissions_are_those_of_makedirs_like_save_pretrained(tmp_path):
    _write(tmp_path / "out", "x")
    os.makedirs(tmp_path / "reference")
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "reference").stat().st_mode


def test_other_writers_temporaries_are_left_alone(tmp_path):
    (tmp_path / f".out.tmp-{os.getppid()}-abc").mkdir()  # a live process (the test runner's parent)
    (tmp_path / ".other.tmp-1-abc").mkdir()  # another target's
    _write(tmp_path / "out", "x")
    assert _hidden(tmp_path) == sorted([f".out.tmp-{os.getppid()}-abc", ".other.tmp-1-abc"])


def test_a_file_at_the_target_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(FileExistsError, match="is a file"):
        _write(tmp_path / "out", "x", overwrite=True)
