"""`hf-slim convert MODEL OUTPUT [--to FAMILY]`: stock MoE checkpoint <-> SlimMoe (`hf_slim.convert_checkpoint`)."""

from __future__ import annotations

import argparse
import functools
from typing import Any

from ._common import check_output
from ._static import CONVERT_FAMILIES

__all__ = ["add_convert_parser", "run_convert"]


def _add_convert_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Checkpoint: a local folder or a Hub repo id (safetensors).")
    parser.add_argument("output", help="Output folder (written atomically).")
    parser.add_argument(
        "--to",
        default="slim_moe",
        metavar="FAMILY",
        help=f"slim_moe (default, from a stock checkpoint) or a stock family: {', '.join(CONVERT_FAMILIES)}.",
    )
    parser.add_argument(
        "--num-mtp-heads",
        type=int,
        default=0,
        help="MTP depths to add when converting a stock checkpoint to SlimMoe (a stock export's own mtp.layers.* "
        "come back without it).",
    )
    parser.add_argument("--drop-mtp", action="store_true", help="Do not keep mtp.* tensors in a stock export.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder.")


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `convert` sub-command to an `argparse` sub-parsers object (the handler is in `args.handler`)."""
    parser = subparsers.add_parser(
        "convert",
        help="Convert a stock MoE checkpoint to SlimMoe (default) or a SlimMoe checkpoint to a stock family, one "
        "tensor at a time.",
    )
    _add_convert_options(parser)
    parser.set_defaults(handler=run_convert)
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Handler of `hf-slim convert`: `hf_slim.convert_checkpoint`, one tensor at a time from the source's files."""
    from ..convert import SUPPORTED_MODEL_TYPES, conversion_configs, conversion_refusal
    from ..convert_streaming import convert_checkpoint, open_source
    from ..hub import tensor_bytes

    targets = ("slim_moe", *SUPPORTED_MODEL_TYPES)
    if args.to not in targets:  # before anything loads; a known family that cannot convert says why (deepseek_v3)
        raise ValueError(conversion_refusal(args.to) or f"--to {args.to}: valid values are {', '.join(targets)}.")
    check_output(args.output, args.overwrite)
    # the configs are translated (and refused with the field at fault) before any weight is read or fetched
    check = functools.partial(conversion_configs, to=args.to, num_mtp_heads=args.num_mtp_heads)
    with open_source(args.model, check) as (reader, _):
        folder = convert_checkpoint(
            reader,
            args.output,
            to=args.to,
            num_mtp_heads=args.num_mtp_heads,
            keep_mtp=not args.drop_mtp,
            overwrite=args.overwrite,
            card_kwargs={"base_model": args.model, "base_model_relation": "convert"},
        )
        bytes_read = reader.bytes_read
    written = tensor_bytes(folder)
    print(f"wrote {folder} ({bytes_read:,} bytes read, {written:,} bytes written)")
    return 0
