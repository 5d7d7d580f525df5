"""`hf-slim prune MODEL_OR_PATH OUTPUT --num-experts N --hidden-size H ...` (flags mirror `PruneConfig`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from ._common import add_options, check_output

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
    from ..pruning.config import SIZE_FIELDS, PruneConfig

    parser.add_argument("model", help="Hub id or local folder of the source model.")
    parser.add_argument("output", help="Output folder (Hub-ready; written atomically).")
    for f in dataclasses.fields(PruneConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.name in SIZE_FIELDS:
            parser.add_argument(flag, type=_size, default=None, help=help_text)
        else:
            parser.add_argument(flag, default=f.default, help=f"{help_text} (default: {f.default})")
    parser.add_argument("--config", help="A pruning_config.json / PruneConfig JSON file; flags override it.")
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
    parser.add_argument("--device", default="cpu", help="Device for calibration (default: cpu).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")


def add_prune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `prune` sub-command to an `argparse` sub-parser set (the handler is in `args.handler`)."""
    parser = subparsers.add_parser(
        "prune",
        help="Calibrate and structurally prune a MoE checkpoint into a smaller one of the same architecture.",
        description=__doc__,
    )
    add_options(parser, _add_prune_options)
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


def run_prune(args: argparse.Namespace) -> int:
    """Handler of `hf-slim prune`: load, (calibrate), prune, save Hub-ready, print the before/after table."""
    import json

    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..pruning.calibration import collect_statistics
    from ..pruning.config import SIZE_FIELDS, PruneConfig
    from ..pruning.export import save_pruned, size_summary
    from ..pruning.prune import prune
    from ..pruning.stats import ImportanceStats

    base: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            base = json.load(f)
        if "prune_config" in base:  # a pruning_config.json written by save_pruned
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
        raise ValueError("nothing to prune: set at least one size flag (e.g. --num-experts, --hidden-size)")
    check_output(args.output, args.overwrite)
    out = Path(args.output)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None
    config.resolve(model.config)  # fail on impossible targets before the (long) calibration
    stats = None
    calibration = None
    if args.stats:
        stats = ImportanceStats.load(args.stats)
        calibration = f"statistics from `{os.path.basename(args.stats)}`"
    elif args.calibration:
        if tokenizer is None:
            raise ValueError(f"calibration: {args.model} has no tokenizer to encode the calibration text")
        data, calibration = read_calibration_texts(args.calibration, args.text_column)
        model.to(args.device)
        stats = collect_statistics(
            model, data, num_samples=args.num_samples, max_length=args.max_length, batch_size=args.batch_size,
            tokenizer=tokenizer, text_column=args.text_column,
        )
        model.to("cpu")
        calibration = f"{calibration}, {stats.metadata['num_samples']} x {stats.metadata['max_length']} tokens"
    before = size_summary(model)
    small = prune(model, config, stats)
    after = size_summary(small)
    folder = save_pruned(
        small, out, prune_config=config, before=before, stats=stats if args.save_stats else None,
        tokenizer=tokenizer, base_model=args.model if not Path(args.model).exists() else None,
        calibration=calibration, overwrite=args.overwrite,
    )
    console = Console()
    console.print(before_after_table(before, after, title=f"hf-slim prune: {args.model}"))
    console.print(f"wrote {folder}")
    return 0
