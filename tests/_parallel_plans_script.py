"""Run by tests/test_parallel_plans.py with 2 CPU processes (gloo), as `_launch.launch_two_processes` starts them:

    _parallel_plans_script.py OUT_DIR DATA_DIR

For every case folder the test saved under DATA_DIR (`cases.json` lists them with their loading arguments), each rank
loads the checkpoint whole (the single-process reference) and sharded by transformers from the config's plans:
- `tp`: `from_pretrained(..., tp_plan="auto")` (the dense tensor-parallel plan over the 2 ranks);
- `ep`: `DistributedConfig(tp_size=2, ep_size=2)` (the expert-parallel plan for the experts, the TP plan elsewhere);
- `ep_fsdp`: `DistributedConfig(fsdp_size=2, ep_size=2)` (the expert-parallel plan alone; transformers' default FSDP
  plan for the rest, both ranks fed the same batch so that the averaged gradients are the single-process ones).
It records the largest differences from the reference of the logits and MTP logits (no grad: the inference paths)
and of the loss and every parameter's gradient (a training step's paths), and which parameters are sharded.
Each rank writes OUT_DIR/rank{r}.json.
"""

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import logging as hf_logging
from transformers.distributed import DistributedConfig

from hf_slim.models.slim_moe import SlimMoeForCausalLM


MODES = {
    "tp": lambda: dict(tp_plan="auto"),
    "ep": lambda: dict(distributed_config=DistributedConfig(tp_size=2, ep_size=2)),
    "ep_fsdp": lambda: dict(distributed_config=DistributedConfig(fsdp_size=2, ep_size=2)),
}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # a collective for a DTensor: every rank gathers the same parameters in the same order
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _outputs(model, ids: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = model(ids, return_mtp=True, return_mtp_logits=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {name: _full(p.grad) for name, p in model.named_parameters() if p.grad is not None}
    return {"logits": out.logits, "mtp_logits": out.mtp_logits or (), "loss": loss.detach(), "grads": grads}


def compare(folder: Path, load_kwargs: dict, mode: str, ids: torch.Tensor) -> dict:
    reference = SlimMoeForCausalLM.from_pretrained(folder, dtype=torch.float32, **load_kwargs).eval()
    want = _outputs(reference, ids)
    model = SlimMoeForCausalLM.from_pretrained(folder, dtype=torch.float32, **load_kwargs, **MODES[mode]()).eval()
    got = _outputs(model, ids)
    missing = sorted(want["grads"].keys() ^ got["grads"].keys())
    return {
        "logits": _max_diff(got["logits"], want["logits"]),
        "mtp_logits": max((_max_diff(g, w) for g, w in zip(got["mtp_logits"], want["mtp_logits"])), default=0.0),
        "mtp_depths": [len(got["mtp_logits"]), len(want["mtp_logits"])],
        "loss": _max_diff(got["loss"], want["loss"]),
        "grads": {name: _max_diff(g, want["grads"][name]) for name, g in got["grads"].items() if name in want["grads"]},
        "grads_missing": missing,
        "sharded": {
            name: list(p.to_local().shape) for name, p in model.named_parameters() if isinstance(p, DTensor)
        },
    }


def main(out_dir: Path, data_dir: Path) -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # `tp_plan=` is deprecated for DistributedConfig
    cases = json.loads((data_dir / "cases.json").read_text())
    ids = torch.arange(2 * 12).reshape(2, 12) * 7 % 128
    results = {}
    for name, load_kwargs in cases.items():
        for mode in MODES:
            results[f"{name}/{mode}"] = compare(data_dir / name, load_kwargs, mode, ids)
    rank = dist.get_rank()
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"world_size": dist.get_world_size(), "results": results}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
