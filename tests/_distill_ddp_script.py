"""Run by tests/test_distillation.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (DDP, gloo)."""

import json
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from test_distillation import SEQ, distill_args, elastic_student, tiny_tokenizer, train_teacher  # noqa: E402

from hf_slim.data import packed_lm_dataset  # noqa: E402
from trainers import SlimDistillationTrainer  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    texts, tokenizer = tiny_tokenizer()
    dataset = packed_lm_dataset(texts, tokenizer, SEQ)
    teacher = train_teacher(dataset, len(tokenizer), steps=5)
    # an elastic student whose "small" variant drops a layer and is trained alone in some steps: DDP must find the
    # unused parameters of those steps (the trainer sets ddp_find_unused_parameters=True)
    student = elastic_student(len(tokenizer))
    args = distill_args(
        out_dir, max_steps=3, per_device_train_batch_size=2, ddp_backend="gloo", lambda_start=0.5,
        elastic_sampling="probabilities",
        elastic_variant_probabilities={"full": 0.5, "small": 0.5},
    )  # fmt: skip
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset.select(range(64)),
        processing_class=tokenizer,
    )
    trainer.train()
    model = getattr(trainer.model_wrapped, "module", trainer.model_wrapped)
    checksum = float(sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(model.parameters())))
    logs = [h for h in trainer.state.log_history if "kd" in h]
    Path(out_dir, f"rank{args.process_index}.json").write_text(
        json.dumps(
            {
                "world_size": args.world_size,
                "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
                "wrapped": type(trainer.model_wrapped).__name__,
                "teacher_wrapped": type(trainer.teacher_model).__name__,
                "checksum": checksum,
                "num_tokens": logs[-1]["num_tokens"],
                "kd": [h["kd"] for h in logs],
                "variants": [sorted({k.split("/")[0] for k in h if "/" in k}) for h in logs],
                "find_unused": getattr(trainer.model_wrapped, "find_unused_parameters", None),
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
