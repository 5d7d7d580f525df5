"""Run by tests/test_aurora_trainer.py under `accelerate launch --num_processes 2 --cpu` (DDP, gloo)."""

import json
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import hf_slim.optim  # noqa: F401  (registers optim="aurora")


sys.path.insert(0, str(Path(__file__).parent))
from test_aurora_trainer import learnable_dataset, tiny_moe  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    model = tiny_moe()
    start = [p.detach().clone() for p in model.parameters()]
    args = TrainingArguments(
        output_dir=out_dir,
        optim="aurora",
        optim_args="pp_iterations=1",
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=3e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        ddp_backend="gloo",
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=learnable_dataset(32))
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    params = list(trainer.model.parameters()) if not hasattr(trainer.model, "module") else list(trainer.model.module.parameters())
    checksum = float(sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(params)))
    moved = float(sum((p.detach() - s).abs().sum() for p, s in zip(params, start)))
    rank = args.process_index
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "world_size": args.world_size,
                "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
                "wrapped": type(trainer.model_wrapped).__name__,
                "optimizer": type(opt).__name__,
                "checksum": checksum,
                "moved": moved,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
    # Tear the gloo group down before the interpreter exits: left to process exit, its threads can abort the
    # process ("terminate called without an active exception") after the run itself succeeded.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
