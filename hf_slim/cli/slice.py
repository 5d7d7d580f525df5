"""`hf-slim slice CHECKPOINT VARIANT OUTPUT`: cut one nested variant out of an elastic checkpoint."""

from __future__ import annotations

import argparse
import functools
from typing import Any

from ._common import check_output

__all__ = ["add_slice_parser", "run_slice"]


def add_slice_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `slice` subcommand on an `argparse` subparsers object."""
    parser = subparsers.add_parser(
        "slice",
        help="Write one nested variant of an elastic SlimMoe checkpoint as a standalone Hub-ready model "
        "(reads only that variant's slices, one tensor at a time).",
    )
    parser.add_argument("checkpoint", help="Elastic checkpoint: a local folder or a Hub repo id.")
    parser.add_argument("variant", help="Variant name from config.json 'elastic' (or 'full').")
    parser.add_argument("output", help="Output folder (written atomically).")
    parser.add_argument(
        "--to",
        dest="model_type",
        default=None,
        help="Export as this stock architecture (e.g. qwen3_moe), where it can hold the variant; default: SlimMoe "
        "with remote code.",
    )
    parser.add_argument("--drop-mtp", action="store_true", help="Do not keep mtp.* tensors in a stock export.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder.")
    parser.set_defaults(handler=run_slice)
    return parser


def run_slice(args: argparse.Namespace) -> int:
    """Handler of `hf-slim slice`: `hf_slim.elastic.slice_checkpoint`, which reads only the variant's slices, one
    tensor at a time; prints the sizes, the parameters and the bytes read and written."""
    from rich.console import Console
    from rich.table import Table

    from ..convert_streaming import meta_model, open_source
    from ..elastic.streaming import check_elastic_source, slice_checkpoint
    from ..hub import tensor_bytes
    from ..utils import count_parameters

    check_output(args.output, args.overwrite)
    description = f"Variant `{args.variant}` sliced out of the elastic checkpoint `{args.checkpoint}` with `hf-slim slice`."
    # the config is checked (family, variant, --to) before any weight is read or fetched
    check = functools.partial(check_elastic_source, variant=args.variant, model_type=args.model_type)
    with open_source(args.checkpoint, check) as (reader, sliced):
        config = reader.config
        total = sum(reader.nbytes(name) for name in reader.names())
        folder = slice_checkpoint(
            reader,
            args.variant,
            args.output,
            model_type=args.model_type,
            keep_mtp=not args.drop_mtp,
            overwrite=args.overwrite,
            card_kwargs={"description": description, "base_model": args.checkpoint, "base_model_relation": "slice"},
        )
        bytes_read = reader.bytes_read
    written = tensor_bytes(folder)
    table = Table(title=f"hf-slim slice {args.variant}")
    table.add_column("")
    table.add_column("full")
    table.add_column(args.variant)
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_experts", "moe_intermediate_size"):
        table.add_row(key, str(getattr(config, key)), str(getattr(sliced, key)))
    counts = count_parameters(meta_model(sliced))
    table.add_row("parameters (total / active)", "", f"{counts['total']:,} / {counts['active']:,}")
    table.add_row("bytes read / written", f"{total:,} (checkpoint)", f"{bytes_read:,} / {written:,}")
    Console().print(table)
    print(f"wrote {folder}")
    return 0
