"""`hf-slim prune MODEL_OR_PATH OUTPUT --num-experts N --hidden-size H ...` (flags mirror `PruneConfig`).

Memory stays bounded by one decoder block, whatever the checkpoint's size: calibration loads one block at a time
(`collect_statistics_layerwise`) and the output is written tensor by tensor from lazy reads of the source
(`prune_checkpoint`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from ._common import TOKENIZER_FILES, check_output, encodes_text, has_tokenizer_files
from ._static import PRUNE_CONFIG_OPTIONS

__all__ = ["add_prune_parser", "before_after_table", "read_calibration_texts", "run_prune"]


def _size(text: str) -> int | float:
    """`24` -> 24 (absolute), `0.5` -> 0.5 (fraction of the source)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither an int nor a fraction") from None


def _add_prune_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hub id or local folder of the source model.")
    parser.add_argument("output", help="Output folder (Hub-ready; written atomically).")
    for name, kind, default, help_text in PRUNE_CONFIG_OPTIONS:  # PruneConfig's fields, without importing it
        flag = "--" + name.replace("_", "-")
        if kind == "size":
            parser.add_argument(flag, type=_size, default=None, help=help_text)
        elif kind == "switch":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, default=default, help=f"{help_text} (default: {default})")
    parser.add_argument("--config", help="A pruning_config.json / PruneConfig JSON file; flags override it.")
    parser.add_argument(
        "--tokenizer",
        help="Tokenizer folder or Hub id for the calibration text and the output (default: MODEL's own tokenizer).",
    )
    parser.add_argument(
        "--calibration",
        help="Calibration text: a file, a folder (its *.txt / *.md / *.py / *.rst files), or a datasets name.",
    )
    parser.add_argument("--text-column", default="text", help="Text column of a datasets calibration set.")
    parser.add_argument("--num-samples", type=int, default=1024, help="Calibration sequences (default: 1024).")
    parser.add_argument("--max-length", type=int, default=2048, help="Tokens per calibration sequence.")
    parser.add_argument("--batch-size", type=int, default=8, help="Calibration batch size.")
    parser.add_argument("--stats", help="Reuse statistics saved by an earlier run instead of calibrating.")
    parser.add_argument("--save-stats", action="store_true", help="Store the statistics in the output folder.")
    parser.add_argument(
        "--device", default="cpu", help="Where calibration runs its blocks, one at a time (cpu, cuda, cuda:1, ...)."
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the calibration forward and of the written weights (default: as the checkpoint stores them).",
    )
    parser.add_argument(
        "--max-memory",
        default=None,
        help="Host memory calibration may use, e.g. 20GB or 16GiB (default: what the machine has available); the "
        "calibration hidden states go to --work-dir when they do not fit.",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="Folder for spilled hidden states and for resuming a killed calibration from its last finished layer "
        "(default: .OUTPUT.calibration beside the output; removed when calibration finishes).",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="Shard size of the output (default: 5GB).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")


def add_prune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `prune` sub-command to an `argparse` sub-parser set (the handler is in `args.handler`)."""
    parser = subparsers.add_parser(
        "prune",
        help="Calibrate and structurally prune a MoE checkpoint into a smaller one of the same architecture.",
        description=__doc__,
    )
    _add_prune_options(parser)
    parser.set_defaults(handler=run_prune)
    return parser


def read_calibration_texts(source: str, text_column: str = "text") -> tuple[Any, str]:
    """Texts (or a dataset) from a file, a folder or a `datasets` name, and a line describing them for the card."""
    path = Path(source)
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")], f"local file `{path.name}`"
    if path.is_dir():
        files = sorted(p for ext in ("*.txt", "*.md", "*.py", "*.rst") for p in path.rglob(ext))
        if not files:
            raise ValueError(f"calibration: folder {source} holds no .txt/.md/.py/.rst files")
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        return texts, f"{len(files)} local text files"
    from datasets import load_dataset

    return load_dataset(source, split="train"), f"the `{source}` dataset"


def before_after_table(before: dict[str, Any], after: dict[str, Any], title: str = "hf-slim prune") -> Any:
    """A rich table with one row per size (total/active params, then every axis)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("ratio", justify="right")
    for key, old in before.items():
        new = after.get(key)
        ratio = f"{new / old:.2f}x" if isinstance(new, (int, float)) and old else ""
        style = "bold" if new != old else None
        table.add_row(key, f"{old:,}", f"{new:,}" if new is not None else "-", ratio, style=style)
    return table


def _prune_config(args: argparse.Namespace) -> Any:
    """The `PruneConfig` of the command line: `--config` (a PruneConfig JSON or a `pruning_config.json`), then flags."""
    import json

    from ..pruning.config import SIZE_FIELDS, PruneConfig

    base: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            try:
                base = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"--config {args.config}: not valid JSON ({error})") from error
        if not isinstance(base, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object, got {type(base).__name__}")
        if "prune_config" in base:  # a pruning_config.json written by save_pruned / prune_checkpoint
            base = base["prune_config"]
        base = PruneConfig.from_dict(base).to_dict()  # validates, names unknown fields
    for f in dataclasses.fields(PruneConfig):
        value = getattr(args, f.name)
        if f.name in SIZE_FIELDS and value is not None:
            base[f.name] = value
        elif f.name not in SIZE_FIELDS and (value != f.default or f.name not in base):
            base[f.name] = value
    config = PruneConfig.from_dict(base)
    if config.is_noop:
        raise ValueError(
            "nothing to prune: set at least one size flag (e.g. --num-experts, --hidden-size) or a budget "
            "(--target-total-params, --target-active-params)"
        )
    return config


def _source_tokenizer(folder: Path | None) -> Any:
    """The source's tokenizer, or None where it has none (no tokenizer files, or files that make no vocabulary)."""
    from transformers import AutoTokenizer

    if not has_tokenizer_files(folder):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        return None
    return tokenizer if encodes_text(tokenizer) else None


def _tokenizer(args: argparse.Namespace, folder: Path | None) -> Any:
    """`--tokenizer`'s tokenizer (bad input if it has no vocabulary), else the source's own, else None."""
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        return _source_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if not encodes_text(tokenizer):
        raise ValueError(
            f"--tokenizer {args.tokenizer}: no tokenizer there (it encodes text to no tokens); pass a folder or Hub id "
            f"with tokenizer files ({' / '.join(TOKENIZER_FILES[:2])})"
        )
    return tokenizer


def _sizes_of(config: Any) -> dict[str, Any]:
    """`size_summary` of the model a config describes, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..pruning.export import size_summary

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return size_summary(model)


def run_prune(args: argparse.Namespace) -> int:
    """Handler of `hf-slim prune`: open the checkpoint lazily, calibrate block by block, prune tensor by tensor into
    a Hub-ready folder, print the before/after table. Memory stays bounded by one block, not the model."""
    from rich.console import Console
    from transformers import AutoConfig

    from ..checkpoints import open_checkpoint
    from ..pruning.layerwise import collect_statistics_layerwise
    from ..pruning.stats import ImportanceStats
    from ..pruning.streaming import prune_checkpoint
    from ..utils import format_bytes

    config = _prune_config(args)
    check_output(args.output, args.overwrite)
    out = Path(args.output)
    reader = open_checkpoint(args.model)
    try:
        stats = None
        calibration = datasets = None
        if args.stats:
            stats = ImportanceStats.load(args.stats)
            calibration = f"statistics from `{os.path.basename(args.stats)}`"
        config.resolve(reader.config, stats)  # impossible targets fail before the (long) calibration
        tokenizer = _tokenizer(args, reader.folder)
        if args.calibration and stats is None:
            if tokenizer is None:
                files = " / ".join(TOKENIZER_FILES[:2])
                has_files = has_tokenizer_files(reader.folder)
                what = "has tokenizer files that make no vocabulary" if has_files else "has no tokenizer files"
                raise ValueError(f"{args.model} {what} ({files}) to encode --calibration; pass --tokenizer or add them")
            data, calibration = read_calibration_texts(args.calibration, args.text_column)
            datasets = None if Path(args.calibration).exists() else [args.calibration]  # a `datasets` name
            work_dir = args.work_dir or out.resolve().parent / f".{out.name}.calibration"
            stats = collect_statistics_layerwise(
                reader, data, num_samples=args.num_samples, max_length=args.max_length, batch_size=args.batch_size,
                tokenizer=tokenizer, text_column=args.text_column, dtype=args.dtype, device=args.device,
                max_memory=args.max_memory, work_dir=work_dir,
            )  # fmt: skip
            calibration = f"{calibration}, {stats.metadata['num_samples']} x {stats.metadata['max_length']} tokens"
        chosen = config.resolve(reader.config, stats)
        folder = prune_checkpoint(
            reader, out, config, stats, dtype=args.dtype, tokenizer=tokenizer,
            base_model=args.model, calibration=calibration, datasets=datasets,
            overwrite=args.overwrite, max_shard_size=args.max_shard_size, save_stats=args.save_stats,
        )  # fmt: skip
        read = reader.bytes_read
        before = _sizes_of(reader.config)
    finally:
        reader.close()
    after = _sizes_of(AutoConfig.from_pretrained(folder))
    console = Console()
    console.print(before_after_table(before, after, title=f"hf-slim prune: {args.model}"))
    if config.has_budget:
        console.print(f"sizes chosen for the budget: {chosen}")
    console.print(f"read {format_bytes(read)} of tensors from {args.model}")
    console.print(f"wrote {folder}")
    return 0
