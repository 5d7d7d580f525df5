"""Shared pieces of the replication scripts behind docs/RESULTS.md: data, tokenizer, the teacher, evaluation, the
tuning protocol and the report files.

Data: the Python sources (code, comments and docstrings) of packages that the lock installs, split BY PACKAGE so the
held-out text is unseen: the training split is `TRAIN_PACKAGES`, learning rates are tuned on `TUNE_PACKAGES`, and
every reported number is measured on `REPORT_PACKAGES`. The versions are fixed by requirements/lock.txt, so every
machine that installs the lock has the same text (each package under its own licence: BSD for networkx, numpy,
matplotlib-compatible PSF-style for matplotlib, MIT for rich and pytest, Apache-2.0 for huggingface_hub and
datasets). Nothing is downloaded.

Everything derived (tokenizer, token streams, the trained teacher) is cached under `outputs/replicate/`, keyed by the
settings that made it, so the scripts share one teacher and a second run skips what is done.

Protocol (issue 16), enforced here rather than in each script:
- `tune_lr` searches a geometric grid on the tune split and extends it until the best value lies strictly inside;
- `train_dataset(seed)` has the same rows in the same order for every method of a seed (`Trainer` shuffles with
  `seed`, which the scripts pass unchanged to every method);
- `report_loss` measures on the report split only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _bench import environment, load_average  # noqa: E402


# Overridable so the smoke tests write elsewhere (tests/test_replicate.py).
CACHE = Path(os.environ.get("HF_SLIM_REPLICATE_CACHE", ROOT / "outputs" / "replicate"))
RESULTS = Path(os.environ.get("HF_SLIM_REPLICATE_RESULTS", ROOT / "docs" / "results"))

TRAIN_PACKAGES = ("networkx", "numpy", "matplotlib", "rich", "_pytest")
TUNE_PACKAGES = ("huggingface_hub",)
REPORT_PACKAGES = ("datasets",)
SPLITS = {"train": TRAIN_PACKAGES, "tune": TUNE_PACKAGES, "report": REPORT_PACKAGES}

VOCAB = 2048  # byte-level BPE trained on the training split
SEQ = 128  # tokens per row everywhere
MAX_FILE_BYTES = 300_000  # larger files are generated tables, not prose or code
EVAL_ROWS = 96  # rows of SEQ tokens per evaluation (tune or report), evenly spaced over the split


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ data


def package_files(package: str) -> list[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed; run `make venv` (it installs the lock).")
    root = Path(list(spec.submodule_search_locations)[0])
    return [p for p in sorted(root.rglob("*.py")) if p.stat().st_size <= MAX_FILE_BYTES]


def split_texts(split: str) -> list[str]:
    """The source files of the split's packages, one text per file, in a fixed order."""
    return [p.read_text(encoding="utf-8", errors="replace") for pkg in SPLITS[split] for p in package_files(pkg)]


def _versions(split: str) -> str:
    from importlib.metadata import packages_distributions, version

    owners = packages_distributions()
    return ",".join(f"{pkg}={version(owners.get(pkg, [pkg])[0])}" for pkg in SPLITS[split])


def tokenizer():
    """A byte-level BPE (`VOCAB` entries) trained on every 4th file of the training split, cached."""
    from transformers import AutoTokenizer

    from hf_slim.data import train_tokenizer

    folder = CACHE / f"tokenizer-{_key(VOCAB, _versions('train'))}"
    if not (folder / "tokenizer.json").exists():
        log(f"training the tokenizer (vocab {VOCAB}) -> {folder}")
        train_tokenizer(split_texts("train")[::4], vocab_size=VOCAB).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def token_stream(split: str) -> torch.Tensor:
    """The split as one int32 token stream (files joined with EOS), cached."""
    tok = tokenizer()
    path = CACHE / f"tokens-{split}-{_key(VOCAB, _versions(split))}.pt"
    if not path.exists():
        log(f"tokenizing the {split} split ({', '.join(SPLITS[split])})")
        stream: list[int] = []
        texts = split_texts(split)
        for start in range(0, len(texts), 256):
            for ids in tok(texts[start : start + 256], add_special_tokens=False)["input_ids"]:
                stream.extend(ids)
                stream.append(tok.eos_token_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.tensor(stream, dtype=torch.int32), path)
    return torch.load(path)


def train_dataset(rows: int | None = None):
    """Non-overlapping `SEQ`-token rows of the training split as a `datasets.Dataset` (`input_ids`); the first
    `rows` of them when given. The same for every method: `Trainer(seed=s)` then gives every method of seed `s` the
    same order."""
    from datasets import Dataset

    stream = token_stream("train")
    n = len(stream) // SEQ if rows is None else min(rows, len(stream) // SEQ)
    return Dataset.from_dict({"input_ids": stream[: n * SEQ].view(n, SEQ).tolist()})


def eval_rows(split: str, rows: int = EVAL_ROWS) -> torch.Tensor:
    """`rows` rows of `SEQ` tokens evenly spaced over the split (`[rows, SEQ]`, long)."""
    if split == "train":
        raise ValueError("evaluate on 'tune' or 'report', not on the training split")
    stream = token_stream(split)
    stride = (len(stream) - SEQ) // rows
    return torch.stack([stream[i * stride : i * stride + SEQ] for i in range(rows)]).long()


@torch.no_grad()
def mean_loss(model, rows: torch.Tensor, batch_size: int = 16, **forward_kwargs) -> float:
    """Mean next-token cross-entropy of the main head of `model` over `rows` (every row has `SEQ` tokens, so a mean
    of means). A SlimMoe with MTP heads adds their losses to `.loss`; its `.lm_loss` is the main head alone. TRL's
    trainers switch `config.output_router_logits` on, which adds the router's aux loss to `.loss`: switched off here."""
    if getattr(model.config, "output_router_logits", None) is not None:
        forward_kwargs.setdefault("output_router_logits", False)
    was_training = model.training
    model.eval()
    losses = []
    for i in range(0, len(rows), batch_size):
        out = model(input_ids=rows[i : i + batch_size], labels=rows[i : i + batch_size], **forward_kwargs)
        main = getattr(out, "lm_loss", None)
        losses.append(float(out.loss if main is None else main))
    model.train(was_training)
    return sum(losses) / len(losses)


def tune_loss(model, **forward_kwargs) -> float:
    return mean_loss(model, eval_rows("tune"), **forward_kwargs)


def report_loss(model, **forward_kwargs) -> float:
    return mean_loss(model, eval_rows("report"), **forward_kwargs)


# ------------------------------------------------------------------------------------------------ models


def teacher_config(**overrides):
    """The stock Qwen3-MoE architecture of the teachers (2.6M parameters at the defaults)."""
    from transformers import Qwen3MoeConfig

    tok = tokenizer()
    settings = dict(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
        norm_topk_prob=True, max_position_embeddings=4 * SEQ, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    settings.update(overrides)
    return Qwen3MoeConfig(**settings)


def training_args(output_dir: Path, *, steps: int, lr: float, seed: int, batch_size: int = 16, **overrides):
    """`TrainingArguments` every from-scratch or LM run uses (cosine, 5% warm-up, no checkpoints, CPU)."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.01, logging_steps=max(1, steps // 20),
        save_strategy="no", report_to="none", use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0,
        disable_tqdm=True,
    )  # fmt: skip
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train_lm(model, *, steps: int, lr: float, seed: int, run_dir: Path, batch_size: int = 16) -> list[float]:
    """Train `model` with `transformers.Trainer` on the LM loss; returns the logged train losses."""
    from transformers import DataCollatorForLanguageModeling, Trainer

    collator = DataCollatorForLanguageModeling(tokenizer(), mlm=False)
    trainer = Trainer(
        model=model, args=training_args(run_dir, steps=steps, lr=lr, seed=seed, batch_size=batch_size),
        train_dataset=train_dataset(), data_collator=collator,
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def trained_teacher(*, steps: int = 1500, lr: float = 3e-3, seed: int = 0, **config_overrides):
    """A stock `Qwen3MoeForCausalLM` trained from scratch with `Trainer` on the training split (LM loss), cached by
    its settings. Returns `(model, folder)`."""
    from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM, set_seed

    config = teacher_config(**config_overrides)
    folder = CACHE / f"teacher-{_key(config.to_json_string(), steps, lr, seed, _versions('train'))}"
    if not (folder / "config.json").exists():
        set_seed(seed)
        model = Qwen3MoeForCausalLM(config)
        log(f"training the teacher ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"{steps} steps of 16 x {SEQ} tokens) -> {folder}")
        started = time.perf_counter()
        train_lm(model, steps=steps, lr=lr, seed=seed, run_dir=CACHE / "runs" / folder.name)
        model.config.use_cache = True
        tmp = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer().save_pretrained(tmp)
        (tmp / "teacher.json").write_text(json.dumps({"steps": steps, "lr": lr, "seed": seed,
                                                       "seconds": time.perf_counter() - started}))
        tmp.rename(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, folder


# ------------------------------------------------------------------------------------------------ protocol


def tune_lr(
    run: Callable[[float], float], grid: Sequence[float], *, max_extensions: int = 4, label: str = ""
) -> tuple[float, dict[float, float]]:
    """Minimise `run(lr)` (a tune-split loss) over a geometric `grid`, extending the grid by its own ratio until the
    best lr lies strictly inside it (issue 16's protocol). Returns the best lr and every lr's loss."""
    grid = sorted(grid)
    if len(grid) < 3:
        raise ValueError(f"tune_lr needs a grid of at least 3 values, got {grid}")
    ratio = grid[1] / grid[0]
    results: dict[float, float] = {}
    for _ in range(max_extensions + 1):
        for lr in grid:
            if lr not in results:
                results[lr] = run(lr)
                log(f"tune {label} lr {lr:.3g}: {results[lr]:.4f}")
        ordered = sorted(results)
        best = min(ordered, key=lambda lr: results[lr] if math.isfinite(results[lr]) else math.inf)
        if best == ordered[0]:
            grid = [ordered[0] / ratio]
        elif best == ordered[-1]:
            grid = [ordered[-1] * ratio]
        else:
            return best, results
    raise RuntimeError(f"tune_lr {label}: the best lr is still at the edge after {max_extensions} extensions: {results}")


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """`mean ± sample std` (n - 1), e.g. `4.123 ± 0.012`."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def grid_text(results: dict[float, float]) -> str:
    return ", ".join(f"{lr:.3g}: {loss:.3f}" for lr, loss in sorted(results.items()))


# ------------------------------------------------------------------------------------------------ report files


class Report:
    """Collects a result file's lines; `write()` adds the command, wall time, machine and versions, and writes
    `docs/results/<name>.md` plus the raw numbers to `docs/results/<name>.json` (for re-plotting)."""

    def __init__(self, name: str, title: str):
        self.name, self.title = name, title
        self.lines: list[str] = []
        self.data: dict = {}
        self.started = time.perf_counter()
        self.load_start = load_average()

    def add(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> None:
        align = align or ("l" + "r" * (len(header) - 1))
        self.add("| " + " | ".join(header) + " |")
        self.add("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
        for row in rows:
            self.add("| " + " | ".join(str(c) for c in row) + " |")
        self.add()

    def write(self) -> Path:
        env = environment()
        seconds = time.perf_counter() - self.started
        threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
        script = " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
        command = f"HF_HUB_OFFLINE=1 {threads}.venv/bin/python {script}"
        head = [
            f"# {self.title}",
            "",
            f"Command: `{command}`",
            "",
            f"Wall time {seconds / 60:.1f} min on {env['cpu']} ({env['cores']} cores, shared; 1-minute load average "
            f"{_load_text(self.load_start)} at the start, {_load_text(load_average())} at the end), {time.strftime('%Y-%m-%d')}. "
            f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}.",
            "",
            f"Data: training split {', '.join(TRAIN_PACKAGES)} ({len(token_stream('train')) / 1e6:.2f}M tokens), "
            f"tune split {', '.join(TUNE_PACKAGES)} ({len(token_stream('tune')) / 1e6:.2f}M), report split "
            f"{', '.join(REPORT_PACKAGES)} ({len(token_stream('report')) / 1e6:.2f}M); byte-level BPE, vocab {VOCAB}; "
            f"evaluation on {EVAL_ROWS} rows of {SEQ} tokens evenly spaced over a split.",
            "",
        ]
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.name}.md"
        path.write_text("\n".join(head + self.lines).rstrip() + "\n")
        self.data["wall_seconds"] = seconds
        (RESULTS / f"{self.name}.json").write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        log(f"wrote {path}")
        return path


def plot_curves(path: Path, panels: Sequence[dict]) -> None:
    """One PNG with a panel per dict: `title`, `xlabel`, `ylabel`, `series` = {label: (x, [curve per seed])}; each
    series is drawn as the mean over seeds with a min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (x, curves) in panel["series"].items():
            stacked = torch.tensor(curves, dtype=torch.float64)
            ax.plot(x, stacked.mean(0).tolist(), label=label)
            if len(curves) > 1:
                ax.fill_between(x, stacked.min(0).values.tolist(), stacked.max(0).values.tolist(), alpha=0.2)
        ax.set_title(panel["title"])
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_text(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f}"


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:10]
