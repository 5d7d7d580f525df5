"""Distill a pruned SlimMoe student (with MTP heads) from its teacher, offline on CPU, in a few minutes.

    python examples/distill_slim_moe.py                      # one stage, Python API
    python examples/distill_slim_moe.py --make-teacher runs/teacher && hf-slim distill examples/distill.yaml

The teacher here is a tiny SlimMoe trained for a few hundred steps on the standard-library docstrings corpus that
ships with hf-slim; replace it with any MoE checkpoint (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral or SlimMoe) and the
dataset with your pretraining data.
"""

from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_slim.data import packed_lm_dataset, stdlib_corpus, train_tokenizer  # noqa: E402
from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM  # noqa: E402
from hf_slim.pruning import PruneConfig, collect_statistics, prune  # noqa: E402
from trainers import SlimDistillationConfig, SlimDistillationTrainer  # noqa: E402


def make_teacher(steps: int = 200, seq: int = 128):
    """A small SlimMoe teacher (4 layers, 8 experts, 1 MTP depth) trained on the offline corpus."""
    texts = stdlib_corpus()
    tokenizer = train_tokenizer(texts, vocab_size=1024)
    dataset = packed_lm_dataset(texts, tokenizer, seq)
    torch.manual_seed(0)
    config = SlimMoeConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=64, mlp_layer_types=["sparse"] * 4,
        num_mtp_heads=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    teacher = SlimMoeForCausalLM(config)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    ids = torch.tensor(dataset["input_ids"])
    for step in range(steps):
        batch = ids[torch.randint(0, len(ids), (16,))]
        loss = teacher(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            print(f"teacher step {step}: loss {loss.item():.3f}")
    return teacher.eval(), tokenizer, dataset, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-teacher", metavar="DIR", help="Only train and save the teacher (for distill.yaml).")
    parser.add_argument("--output-dir", default="runs/distilled-example")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--teacher-steps", type=int, default=200)
    cli = parser.parse_args()

    teacher, tokenizer, dataset, texts = make_teacher(cli.teacher_steps)
    if cli.make_teacher:
        teacher.save_pretrained(cli.make_teacher)
        tokenizer.save_pretrained(cli.make_teacher)
        print(f"wrote {cli.make_teacher}")
        return

    # prune: drop the last layer, a quarter of the hidden channels and half of the experts (SlimQwen's choices)
    stats = collect_statistics(teacher, texts, num_samples=32, max_length=128, tokenizer=tokenizer)
    student = prune(teacher, PruneConfig(num_hidden_layers=3, hidden_size=96, num_experts=4), stats)

    args = SlimDistillationConfig(
        output_dir=cli.output_dir,
        max_steps=cli.max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        max_length=128,
        logging_steps=10,
        save_strategy="no",
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        report_to=[],
    )
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    last = [h for h in trainer.state.log_history if "kd" in h][-1]
    print({k: round(v, 4) for k, v in last.items() if k in ("lm", "kd", "mtp_lm", "mtp_kd", "aux", "lambda", "beta")})
    trainer.save_model(cli.output_dir)
    print(f"wrote {cli.output_dir}")


if __name__ == "__main__":
    main()
