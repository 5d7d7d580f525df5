"""Run by tests/test_distill_fsdp2.py under `accelerate launch --config_file examples/accelerate_fsdp2.yaml` with 2 CPU
processes (FSDP2 over gloo; tests/_fsdp_cpu.py says why CPU needs a shim).

    _distill_fsdp2_script.py OUT_DIR DATA_DIR RUNS

DATA_DIR holds the teacher and tokenizer the test made. RUNS is a comma-separated list of runs from
`test_distill_fsdp2.RUNS`; each writes its logged terms and (rank 0) its final full parameters to OUT_DIR/<run>/.
"""

import json
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from _fsdp_cpu import enable_fsdp_on_cpu  # noqa: E402


enable_fsdp_on_cpu()

from safetensors.torch import save_file  # noqa: E402
from test_distill_fsdp2 import RUNS, eval_rows, load_pair, logged_terms, run_args  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from trainers import SlimDistillationTrainer  # noqa: E402


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered to its full tensor (a collective: all ranks call it)."""
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().contiguous()
        for name, p in model.named_parameters()
    }


def run(name: str, out_dir: Path, data_dir: Path) -> dict:
    spec = RUNS[name]
    tokenizer, dataset, teacher, student = load_pair(data_dir)
    args = run_args(out_dir / name, spec)
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    resume = spec.get("resume_from")
    trainer.train(resume_from_checkpoint=str(out_dir / resume) if resume else None)
    model = trainer.model
    params = full_parameters(model)
    result = {
        "world_size": args.world_size,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version,
        "student_class": type(model).__name__,
        "student_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "head_sharded": isinstance(model.lm_head.weight, DTensor),
        "head_local_rows": (
            model.lm_head.weight.to_local().shape[0] if isinstance(model.lm_head.weight, DTensor) else None
        ),
        "teacher_class": type(trainer.teacher_model).__name__,
        "teacher_units": sum(isinstance(m, FSDPModule) for m in trainer.teacher_model.modules()),
        "optimizer_params_dtensor": all(
            isinstance(p, DTensor) for group in trainer.optimizer.param_groups for p in group["params"]
        ),
        # each parameter exactly once (empty shards, e.g. the [1, 32] gates on rank 1, must not collapse into one)
        "optimizer_params_once": sorted(id(p) for group in trainer.optimizer.param_groups for p in group["params"])
        == sorted(id(p) for p in model.parameters()),
        "logs": logged_terms(trainer),
    }
    if spec.get("evaluate"):
        result["eval"] = trainer.evaluate(eval_rows(dataset))
    if spec.get("export"):
        # a standalone checkpoint from the sharded student: FULL_STATE_DICT makes save_model write model.safetensors
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(out_dir / name / "final"))
    if args.process_index == 0:
        save_file(params, str(out_dir / name / "params.safetensors"))
    return result


def main(out_dir: str, data_dir: str, runs: str) -> None:
    torch.set_num_threads(1)
    out, data = Path(out_dir), Path(data_dir)
    results = {name: run(name, out, data) for name in runs.split(",")}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:4])
    # Tear the gloo group down before the interpreter exits (see tests/_distill_ddp_script.py).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
