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


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs the right to mount, as root in a container; skipped elsewhere: the ENOSPC tests above
    inject the error instead)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_a_real_full_disk_leaves_no_partial_model_folder_and_no_partial_shard(small_disk):
    """save_for_hub of a 2.6 MB model and a teacher-logits shard on a 1 MiB filesystem: ENOSPC, the old folder and the
    finished shards stay as they were, and no temporary is left behind."""
    import torch
    from safetensors import SafetensorError
    from test_distillation import tiny_config, tiny_tokenizer

    from hf_slim.hub import save_for_hub
    from hf_slim.models.slim_moe import SlimMoeForCausalLM
    from hf_slim.teacher_logits import write_teacher_logits

    target = small_disk / "model"
    _write(target, "old")
    model = SlimMoeForCausalLM(tiny_config(5000, hidden_size=64))
    # transformers' save_pretrained lets safetensors' own error through (not an OSError; the CLI reports it in one line)
    with pytest.raises((OSError, SafetensorError), match="No space left on device"):
        save_for_hub(model, target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["config.json"] and _hidden(small_disk) == []

    _, tokenizer = tiny_tokenizer()
    teacher = SlimMoeForCausalLM(tiny_config(len(tokenizer))).eval()
    rows = [{"input_ids": torch.randint(0, len(tokenizer), (32,)).tolist()} for _ in range(64)]
    with pytest.raises(OSError, match="writing .*logits-0000.\\.safetensors.*No space left") as error:  # 64 rows x 32 positions x (k=128 x 8 bytes): about 2 MB of shards
        write_teacher_logits(teacher, rows, small_disk / "logits", tokenizer=tokenizer, top_k=128, max_length=32,
                             max_shard_size="200KB", progress=False)  # fmt: skip
    assert error.value.errno == errno.ENOSPC
    left = sorted(p.name for p in (small_disk / "logits").iterdir())
    assert left and all(".tmp-" not in name for name in left)  # finished shards + teacher_logits.json, no partial one
