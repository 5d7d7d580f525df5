"""The main job on an embedded default (`hf-slim demo`, `make demo`): everything runs offline on CPU in minutes.

1. Corpus: the Python standard library's documentation (`hf_slim.data`), a byte-level BPE tokenizer trained on it.
2. Teacher: a small stock `Qwen3MoeForCausalLM` trained with `transformers.Trainer` on that text.
3. Convert it losslessly to SlimMoe (`hf_slim.convert.from_hf`) with multi-token-prediction heads; check parity.
4. Train the SlimMoe model (LM + MTP loss) with `Trainer`; report each loss term before and after.
5. Export Hub-ready folders: SlimMoe with remote code, and stock Qwen3-MoE keeping `mtp.*`; reload and generate.

The pipeline grows with the project (pruning, distillation, elastic variants come in later stages).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .convert import from_hf
from .data import packed_lm_dataset, stdlib_corpus, train_tokenizer
from .hub import save_for_hub
from .utils import count_parameters


@dataclass
class DemoConfig:
    """Sizes of the embedded default run."""

    output_dir: str = "outputs/demo"
    vocab_size: int = 1024
    block_size: int = 128
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 96
    num_mtp_heads: int = 2
    teacher_steps: int = 300
    slim_steps: int = 100
    batch_size: int = 16
    learning_rate: float = 3e-3
    eval_documents: int = 60
    seed: int = 0

    def __post_init__(self):
        for name in ("teacher_steps", "slim_steps", "batch_size", "block_size", "hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DemoConfig.{name} must be positive, got {getattr(self, name)}.")


def _train(model, dataset, collator, config: DemoConfig, steps: int, run_dir: Path) -> None:
    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.01,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=config.seed,
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()


@torch.no_grad()
def _eval_losses(model, dataset, collator, batch_size: int = 16) -> dict[str, float]:
    model.eval()
    totals: dict[str, float] = {}
    batches = 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        terms = {"lm": (out.lm_loss if getattr(out, "lm_loss", None) is not None else out.loss).item()}
        for k, loss in enumerate(getattr(out, "mtp_losses", None) or (), start=1):
            terms[f"mtp_{k}"] = loss.item()
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + value
        batches += 1
    return {key: value / batches for key, value in totals.items()}


def run_demo(config: DemoConfig | None = None, console: Console | None = None) -> dict:
    """Run the embedded default pipeline and return its summary (also written to `output_dir/summary.json`)."""
    config = config or DemoConfig()
    console = console or Console()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    started = time.perf_counter()

    console.rule("[bold]1. Corpus and tokenizer")
    texts = stdlib_corpus()
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
    train_set = packed_lm_dataset(texts[: -config.eval_documents], tokenizer, config.block_size)
    eval_set = packed_lm_dataset(texts[-config.eval_documents :], tokenizer, config.block_size)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    console.print(f"{len(texts)} stdlib docstrings -> {len(train_set)} train / {len(eval_set)} eval blocks "
                  f"of {config.block_size} tokens (vocab {len(tokenizer)})")

    console.rule("[bold]2. Teacher: stock Qwen3-MoE trained with Trainer")
    teacher_config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=2 * config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=config.hidden_size // 4,
        num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.moe_intermediate_size,
        norm_topk_prob=True,
        max_position_embeddings=4 * config.block_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    teacher = Qwen3MoeForCausalLM(teacher_config)
    _train(teacher, train_set, collator, config, config.teacher_steps, out / "runs" / "teacher")
    teacher_eval = _eval_losses(teacher, eval_set, collator)
    console.print(f"teacher eval loss {teacher_eval['lm']:.3f} (perplexity {math.exp(teacher_eval['lm']):.1f})")

    console.rule("[bold]3. Lossless conversion to SlimMoe with MTP heads")
    slim = from_hf(teacher, num_mtp_heads=config.num_mtp_heads)
    probe = torch.tensor([eval_set[0]["input_ids"]])
    with torch.no_grad():
        parity = (slim(probe).logits - teacher(probe).logits).abs().max().item()
    slim_before = _eval_losses(slim, eval_set, collator)
    console.print(f"max |logit difference| teacher vs SlimMoe: {parity:.2e}")

    console.rule("[bold]4. Train SlimMoe (LM + MTP losses) with Trainer")
    _train(slim, train_set, collator, config, config.slim_steps, out / "runs" / "slim_moe")
    slim_after = _eval_losses(slim, eval_set, collator)

    console.rule("[bold]5. Hub-ready exports")
    slim_dir = save_for_hub(slim, out / "slim_moe", processing_class=tokenizer, overwrite=True,
                            card_kwargs={"recipe": "Converted from a Qwen3-MoE teacher trained on Python "
                                         "stdlib documentation; MTP heads trained with LM + MTP loss."})
    stock_dir = save_for_hub(slim, out / "qwen3_moe", model_type="qwen3_moe", processing_class=tokenizer,
                             overwrite=True)
    reloaded = AutoModelForCausalLM.from_pretrained(slim_dir, trust_remote_code=True).eval()
    prompt = tokenizer("Return a list of", return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    sample = tokenizer.decode(generated[0], skip_special_tokens=True)

    counts = count_parameters(slim)
    summary = {
        "config": asdict(config),
        "teacher_eval_loss": teacher_eval["lm"],
        "conversion_max_abs_logit_diff": parity,
        "slim_eval_before": slim_before,
        "slim_eval_after": slim_after,
        "parameters": counts,
        "exports": {"slim_moe": str(slim_dir), "qwen3_moe": str(stock_dir)},
        "sample": sample,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    table = Table(title="hf-slim demo")
    table.add_column("loss (eval)")
    table.add_column("teacher", justify="right")
    table.add_column("SlimMoe after conversion", justify="right")
    table.add_column("SlimMoe after training", justify="right")
    for key in slim_after:
        table.add_row(key, f"{teacher_eval[key]:.3f}" if key in teacher_eval else "-",
                      f"{slim_before[key]:.3f}", f"{slim_after[key]:.3f}")
    console.print(table)
    console.print(f"parameters: total {counts['total']:,}, active/token {counts['active']:,}, MTP {counts['mtp']:,}")
    console.print(f"sample: {sample!r}")
    console.print(f"exports: {slim_dir} (remote code), {stock_dir} (stock Qwen3-MoE + mtp.*); "
                  f"{summary['seconds']} s")
    return summary


__all__ = ["DemoConfig", "run_demo"]
