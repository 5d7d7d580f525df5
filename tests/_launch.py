"""Run a script under `accelerate launch` with 2 CPU processes (DDP over gloo) and read each rank's JSON result."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def launch_two_processes(
    script: Path, out_dir: Path, timeout: int = 300, config_file: Path | None = None, args: tuple[str, ...] = ()
) -> list[dict]:
    """`script OUT_DIR [ARGS]` must write `OUT_DIR/rank{r}.json` on each rank; returns those two dicts.

    `config_file`: an accelerate config (e.g. examples/accelerate_fsdp2.yaml) instead of `--multi_gpu`; the flags
    below override its process count and mixed precision."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `--multi_gpu` selects accelerate's torchrun launcher; without CUDA each process joins a gloo group.
    # (`--cpu` with several processes would need mpirun.)
    mode = ["--config_file", str(config_file)] if config_file is not None else ["--multi_gpu"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), str(script), str(out_dir), *args,
    ]  # fmt: skip
    # its own session, so that a timeout ends the launcher's rank processes too (killing only the launcher would leave
    # the ranks running, blocked in a collective)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"launch timed out after {timeout} s\n" + stdout[-3000:] + stderr[-3000:]) from None
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
