"""Run a script under `accelerate launch` with 2 CPU processes (DDP over gloo) and read each rank's JSON result."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def launch_two_processes(script: Path, out_dir: Path, timeout: int = 300) -> list[dict]:
    """`script OUT_DIR` must write `OUT_DIR/rank{r}.json` on each rank; returns those two dicts."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `--multi_gpu` selects accelerate's torchrun launcher; without CUDA each process joins a gloo group.
    # (`--cpu` with several processes would need mpirun.)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), str(script), str(out_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
