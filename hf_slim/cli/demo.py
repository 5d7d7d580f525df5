"""`hf-slim demo`: the embedded end-to-end pipeline, offline on CPU (flags mirror `hf_slim.demo.DemoConfig`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ._static import DEMO_CONFIG_OPTIONS

__all__ = ["DEMO_HELP", "add_demo_parser", "run_demo"]

#: The help of each `DemoConfig` field's flag (its type and default come from `hf_slim.cli._static`).
DEMO_HELP = {
    "output_dir": "Folder for the runs, the Hub-ready exports and summary.json.",
    "vocab_size": "Vocabulary of the byte-level BPE tokenizer trained on the corpus.",
    "block_size": "Tokens per training sequence: the corpus is packed into blocks this long.",
    "hidden_size": "Hidden size of the teacher (a positive multiple of 16); the student is pruned from it.",
    "num_hidden_layers": "Decoder layers of the teacher (at least 2).",
    "num_experts": "Routed experts per layer of the teacher (at least 4).",
    "num_experts_per_tok": "Experts each token is routed to (top-k).",
    "moe_intermediate_size": "FFN width of each expert of the teacher.",
    "num_mtp_heads": "Multi-token-prediction depths added when the teacher is converted to SlimMoe.",
    "teacher_steps": "Training steps of the teacher.",
    "distill_steps": "Distillation steps that recover the pruned student.",
    "calibration_samples": "Calibration sequences for the pruning statistics.",
    "batch_size": "Sequences per training step.",
    "learning_rate": "Learning rate of the teacher (the distillation uses a third of it).",
    "eval_documents": "Corpus documents held out for evaluation.",
    "seed": "Random seed of the whole run.",
}
_TYPES = {"int": int, "float": float, "str": str}


def _add_demo_options(parser: argparse.ArgumentParser) -> None:
    for name, type_name, default in DEMO_CONFIG_OPTIONS:  # DemoConfig's fields, without importing hf_slim.demo
        flag = "--" + name.replace("_", "-")
        help_text = f"{DEMO_HELP.get(name, '')} (default: {default})".lstrip()
        parser.add_argument(flag, type=_TYPES[type_name], default=default, help=help_text)


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `demo` sub-command to an `argparse` sub-parsers object (the handler is in `args.handler`)."""
    parser = subparsers.add_parser(
        "demo",
        help="Run the embedded end-to-end pipeline offline on CPU.",
        description="Train a small stock Qwen3-MoE teacher on the standard library's documentation, convert it to "
        "SlimMoe, prune and distill a student, nest a smaller variant and export Hub-ready folders, offline on CPU.",
    )
    _add_demo_options(parser)
    parser.set_defaults(handler=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Handler of `hf-slim demo`: [`hf_slim.demo.run_demo`] with the flags as its `DemoConfig`."""
    from ..demo import DemoConfig
    from ..demo import run_demo as run_pipeline

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}
    run_pipeline(DemoConfig(**fields))
    return 0
