"""`hf-slim distill CONFIG.yaml`: the argparse wiring of [`trainers.progressive.run_progressive`]."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_distill_parser", "run_distill"]


def add_distill_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `distill` sub-command to an `argparse` sub-parsers object.

    Args:
        subparsers: The object returned by `ArgumentParser.add_subparsers()`.

    Returns:
        `argparse.ArgumentParser`: the `distill` parser (its handler is [`run_distill`]).
    """
    parser = subparsers.add_parser(
        "distill",
        help="Progressive prune -> distill stages from a YAML config (SlimDistillationConfig + script fields).",
    )
    parser.add_argument("config", help="YAML file with DistillScriptArguments and SlimDistillationConfig fields.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing final folder.")
    parser.set_defaults(handler=run_distill)
    return parser


def run_distill(args: argparse.Namespace) -> int:
    """Run the stages of `args.config`; print the final folder. Returns the exit code."""
    from trainers.progressive import load_distill_config, run_progressive

    script_args, training_args = load_distill_config(args.config)
    if args.overwrite:
        script_args.overwrite = True
    final_dir, results = run_progressive(script_args, training_args)
    for r in results:
        print(f"stage {r.index}: {r.tokens} tokens, {r.steps} steps -> {r.output_dir}")
    print(f"wrote {final_dir}")
    return 0
