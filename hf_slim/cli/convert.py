"""`hf-slim convert MODEL OUTPUT [--to FAMILY]`: stock MoE checkpoint <-> SlimMoe (`hf_slim.convert`)."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import add_options, check_output

__all__ = ["add_convert_parser", "run_convert"]


def _add_convert_options(parser: argparse.ArgumentParser) -> None:
    from ..convert import SUPPORTED_MODEL_TYPES

    parser.add_argument("model", help="Local checkpoint folder.")
    parser.add_argument("output", help="Output folder (written atomically).")
    parser.add_argument("--to", choices=("slim_moe", *SUPPORTED_MODEL_TYPES), default="slim_moe")
    parser.add_argument("--num-mtp-heads", type=int, default=0, help="MTP depths to add when converting to SlimMoe.")
    parser.add_argument("--drop-mtp", action="store_true", help="Do not keep mtp.* tensors in a stock export.")
    parser.add_argument("--overwrite", action="store_true")


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `convert` sub-command to an `argparse` sub-parsers object (the handler is in `args.handler`)."""
    parser = subparsers.add_parser(
        "convert",
        help="Convert a local stock MoE checkpoint to SlimMoe (default) or a SlimMoe checkpoint to a stock family.",
    )
    add_options(parser, _add_convert_options)
    parser.set_defaults(handler=run_convert)
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Handler of `hf-slim convert`: load, convert, `hf_slim.hub.save_for_hub`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..convert import from_hf
    from ..hub import save_for_hub
    from ..models.slim_moe import SlimMoeForCausalLM

    check_output(args.output, args.overwrite)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None
    if args.to == "slim_moe":
        if not isinstance(model, SlimMoeForCausalLM):
            model = from_hf(model, num_mtp_heads=args.num_mtp_heads)
        folder = save_for_hub(model, args.output, processing_class=tokenizer, overwrite=args.overwrite)
    else:
        if not isinstance(model, SlimMoeForCausalLM):
            model = from_hf(model)
        folder = save_for_hub(
            model, args.output, model_type=args.to, keep_mtp=not args.drop_mtp, processing_class=tokenizer,
            overwrite=args.overwrite,
        )
    print(f"wrote {folder}")
    return 0
