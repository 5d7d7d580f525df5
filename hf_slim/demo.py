"""The main job on an embedded default (`hf-slim demo`, `make demo`): everything runs offline on CPU in minutes.

1. Corpus: the Python standard library's documentation (`hf_slim.data`), a byte-level BPE tokenizer trained on it.
2. Teacher: a small stock `Qwen3MoeForCausalLM` trained with `transformers.Trainer` on that text.
3. Convert it losslessly to SlimMoe (`hf_slim.convert.from_hf`) with multi-token-prediction heads; check parity.
4. Calibrate (`collect_statistics`) and prune it SlimQwen-style (`prune`: last layer, a quarter of the hidden
   channels, half of the experts with partial preservation).
5. Recover the student with `SlimDistillationTrainer` (LM + KD + MTP-LM + MTP-KD from the stock teacher).
6. Nest a smaller variant inside the student (`make_elastic`) and evaluate both sizes from the one checkpoint.
7. Export Hub-ready folders: the elastic SlimMoe (remote code), stock Qwen3-MoE keeping `mtp.*`, and the small
   variant sliced out; reload the elastic export through its shipped modeling code (in a Python process where
   hf_slim cannot be imported) and generate there with the small variant thinking and the full one answering.
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
    DataCollatorForLanguageModeling,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .convert import from_hf
from .data import packed_lm_dataset, stdlib_corpus, train_tokenizer
from .elastic import ElasticBudget, ElasticConfig, make_elastic, slice_variant
from .hub import run_without_hf_slim, save_for_hub
from .pruning import PruneConfig, collect_statistics, prune
from .utils import count_parameters


@dataclass
class DemoConfig:
    """Sizes of the embedded default run."""

    output_dir: str = "outputs/demo"
    # the data: a tokenizer trained on the corpus, cut into blocks
    vocab_size: int = 1024
    block_size: int = 128
    # the teacher (the student is pruned from it)
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 96
    num_mtp_heads: int = 2
    # the runs
    teacher_steps: int = 300
    distill_steps: int = 150
    calibration_samples: int = 64
    batch_size: int = 16
    learning_rate: float = 3e-3
    eval_documents: int = 60
    seed: int = 0

    def __post_init__(self):
        for name in ("teacher_steps", "distill_steps", "calibration_samples", "batch_size", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DemoConfig.{name} must be positive, got {getattr(self, name)}.")
        for name, low in (("num_mtp_heads", 0), ("eval_documents", 0), ("moe_intermediate_size", 1), ("vocab_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"DemoConfig.{name} must be >= {low}, got {getattr(self, name)}.")
        if not self.learning_rate > 0:
            raise ValueError(f"DemoConfig.learning_rate must be a number > 0, got {self.learning_rate}.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"DemoConfig.num_experts_per_tok must be between 1 and num_experts={self.num_experts}, got "
                f"{self.num_experts_per_tok}."
            )
        if self.hidden_size <= 0 or self.hidden_size % 16 or self.num_experts < 4 or self.num_hidden_layers < 2:
            raise ValueError(
                "DemoConfig needs hidden_size a positive multiple of 16, num_experts >= 4 and num_hidden_layers >= 2 "
                f"to prune and nest; got hidden_size={self.hidden_size}, num_experts={self.num_experts}, "
                f"num_hidden_layers={self.num_hidden_layers}."
            )


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


def _distill(student, teacher, dataset, tokenizer, config: DemoConfig, run_dir: Path) -> None:
    from trainers import SlimDistillationConfig, SlimDistillationTrainer

    args = SlimDistillationConfig(
        output_dir=str(run_dir),
        max_steps=config.distill_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate / 3,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, config.distill_steps // 20),
        max_length=config.block_size,
        logging_steps=max(1, config.distill_steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=config.seed,
    )
    SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    ).train()


#: Runs in `run_without_hf_slim`: loads an elastic export with only transformers/torch and generates with a budget.
_SHIPPED_CODE_GENERATION = """
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

params = json.loads(__PARAMS__)
tokenizer = AutoTokenizer.from_pretrained(params["folder"], trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(params["folder"], trust_remote_code=True).eval()
cls = type(model)
if not cls.__module__.startswith("transformers_modules"):
    raise SystemExit(f"loaded {cls.__module__}.{cls.__name__}, not the modeling code shipped in the folder")
budget = sys.modules[cls.__module__].ElasticBudget(
    params["think_variant"], end_think_token_id=tokenizer.convert_tokens_to_ids("</think>"),
    max_thinking_tokens=params["max_thinking_tokens"],
)
prompt = tokenizer(params["prompt"], return_tensors="pt")
with torch.no_grad():
    generated = model.generate(**prompt, elastic_budget=budget, max_new_tokens=params["max_new_tokens"],
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)
print("HF_SLIM_RESULT " + json.dumps({
    "class": f"{cls.__module__}.{cls.__name__}",
    "token_ids": generated[0].tolist(),
    "text": tokenizer.decode(generated[0], skip_special_tokens=False),
}))
"""


def _generate_with_shipped_code(folder: Path, **params) -> dict:
    """Load the export `folder` where hf_slim cannot be imported (so `trust_remote_code=True` resolves to the
    modeling code shipped in the folder) and generate there with an `ElasticBudget`."""
    script = _SHIPPED_CODE_GENERATION.replace("__PARAMS__", repr(json.dumps({"folder": str(folder), **params})))
    result = run_without_hf_slim(script)
    marker = "HF_SLIM_RESULT "
    lines = [line.split(marker, 1)[1] for line in result.stdout.splitlines() if marker in line]
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"reloading {folder} through its shipped modeling code failed (exit code {result.returncode}):\n"
            f"{result.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


@torch.no_grad()
def _eval_losses(model, dataset, collator, batch_size: int = 16, **forward_kwargs) -> dict[str, float]:
    model.eval()
    totals: dict[str, float] = {}
    batches = 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        out = model(input_ids=batch["input_ids"], labels=batch["labels"], **forward_kwargs)
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
    rows: dict[str, dict] = {}

    console.rule("[bold]1. Corpus and tokenizer")
    texts = stdlib_corpus()
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
    train_texts = texts[: -config.eval_documents]
    train_set = packed_lm_dataset(train_texts, tokenizer, config.block_size)
    eval_set = packed_lm_dataset(texts[-config.eval_documents :], tokenizer, config.block_size)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    console.print(f"{len(texts)} stdlib docstrings -> {len(train_set)} train / {len(eval_set)} eval blocks "
                  f"of {config.block_size} tokens (vocab {len(tokenizer)})")

    console.rule("[bold]2. Teacher: stock Qwen3-MoE trained with Trainer")
    hidden = config.hidden_size
    teacher = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=True,
        max_position_embeddings=4 * config.block_size, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    _train(teacher, train_set, collator, config, config.teacher_steps, out / "runs" / "teacher")
    rows["teacher (stock Qwen3-MoE)"] = {"losses": _eval_losses(teacher, eval_set, collator),
                                          "params": count_parameters(teacher)}

    console.rule("[bold]3. Lossless conversion to SlimMoe with MTP heads")
    full = from_hf(teacher, num_mtp_heads=config.num_mtp_heads)
    probe = torch.tensor([eval_set[0]["input_ids"]])
    with torch.no_grad():
        parity = (full(probe).logits - teacher(probe).logits).abs().max().item()
    console.print(f"max |logit difference| teacher vs SlimMoe: {parity:.2e}")

    console.rule("[bold]4. Calibrate and prune (SlimQwen)")
    stats = collect_statistics(full, train_texts, tokenizer=tokenizer, num_samples=config.calibration_samples,
                               max_length=config.block_size, batch_size=8)
    prune_config = PruneConfig(
        num_hidden_layers=config.num_hidden_layers - 1, hidden_size=3 * hidden // 4,
        num_experts=config.num_experts // 2, expert_strategy="partial_preserve",
    )
    student = prune(full, prune_config, stats)
    rows["pruned, before recovery"] = {"losses": _eval_losses(student, eval_set, collator),
                                        "params": count_parameters(student)}

    console.rule("[bold]5. Recover with SlimDistillationTrainer (LM + KD + MTP-LM + MTP-KD)")
    _distill(student, teacher, train_set, tokenizer, config, out / "runs" / "distill")
    rows["pruned + distilled"] = {"losses": _eval_losses(student, eval_set, collator),
                                   "params": count_parameters(student)}

    console.rule("[bold]6. Nest a small variant inside the student")
    student_stats = collect_statistics(student, train_texts, tokenizer=tokenizer,
                                       num_samples=config.calibration_samples, max_length=config.block_size,
                                       batch_size=8)
    small_sizes = {"hidden_size": hidden // 2, "num_experts": config.num_experts // 4, "num_experts_per_tok": 1}
    elastic = make_elastic(student, ElasticConfig(variants={"small": small_sizes}), student_stats)
    small = slice_variant(elastic, "small")
    rows["elastic 'small' (runtime view)"] = {
        "losses": _eval_losses(elastic, eval_set, collator, elastic_variant="small"),
        "params": count_parameters(small),
    }

    console.rule("[bold]7. Hub-ready exports")
    recipe = (f"Pruned from a Qwen3-MoE teacher trained on Python stdlib documentation ({prune_config.to_dict()}), "
              f"recovered with {config.distill_steps} steps of SlimDistillationTrainer, nested variant 'small' "
              f"({small_sizes}).")

    def card(row: str) -> dict:
        # what was measured on the held-out docstrings; the teacher lives in memory only (no Hub id nor folder for
        # `base_model`), the data is local (named in the card's body, not in `datasets`)
        lm = rows[row]["losses"]["lm"]
        return {"recipe": recipe, "datasets": ["hf_slim:stdlib"], "eval_dataset": "held-out stdlib docstrings",
                "results": {"eval_loss": lm, "perplexity": math.exp(lm)}}

    # the nested full model and its stock export compute what the distilled student does
    elastic_dir = save_for_hub(elastic, out / "slim_moe_elastic", processing_class=tokenizer, overwrite=True,
                               card_kwargs=card("pruned + distilled"))
    stock_dir = save_for_hub(student, out / "qwen3_moe", model_type="qwen3_moe", processing_class=tokenizer,
                             overwrite=True, card_kwargs=card("pruned + distilled"))
    small_dir = save_for_hub(small, out / "slim_moe_small", processing_class=tokenizer, overwrite=True,
                             card_kwargs=card("elastic 'small' (runtime view)"))
    generation = {"prompt": "Return a list of", "think_variant": "small", "max_thinking_tokens": 12,
                  "max_new_tokens": 16}
    shipped = _generate_with_shipped_code(elastic_dir, **generation)
    prompt = tokenizer(generation["prompt"], return_tensors="pt")
    budget = ElasticBudget(generation["think_variant"], end_think_token_id=tokenizer.convert_tokens_to_ids("</think>"),
                           max_thinking_tokens=generation["max_thinking_tokens"])
    with torch.no_grad():
        in_process = elastic.generate(**prompt, elastic_budget=budget, max_new_tokens=generation["max_new_tokens"],
                                      do_sample=False, pad_token_id=tokenizer.pad_token_id)
    sample = shipped["text"]
    reload = {"class": shipped["class"], "hf_slim_importable": False,
              "matches_in_process": shipped["token_ids"] == in_process[0].tolist()}

    summary = {
        "config": asdict(config),
        "conversion_max_abs_logit_diff": parity,
        "prune_config": prune_config.to_dict(),
        "stages": rows,
        "exports": {"elastic": str(elastic_dir), "qwen3_moe": str(stock_dir), "small": str(small_dir)},
        "budget_generation_sample": sample,
        "shipped_code_reload": reload,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    table = Table(title="hf-slim demo (eval loss on held-out stdlib docs)")
    for column in ("model", "total params", "active params", "lm loss", "perplexity", "mtp losses"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, row in rows.items():
        losses = row["losses"]
        mtp = ", ".join(f"{v:.3f}" for k, v in losses.items() if k.startswith("mtp")) or "-"
        table.add_row(name, f"{row['params']['total']:,}", f"{row['params']['active']:,}", f"{losses['lm']:.3f}",
                      f"{math.exp(losses['lm']):.1f}", mtp)
    console.print(table)
    console.print(f"reloaded {elastic_dir.name} through its shipped modeling code ({reload['class']}, hf_slim not "
                  f"importable); same tokens as in this process: {reload['matches_in_process']}")
    console.print(f"budget generation (small thinks, full answers): {sample!r}")
    console.print(f"exports: {elastic_dir}, {stock_dir}, {small_dir}; {summary['seconds']} s")
    return summary


__all__ = ["DemoConfig", "run_demo"]
