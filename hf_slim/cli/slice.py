"""`hf-slim slice CHECKPOINT VARIANT OUTPUT`: cut one nested variant out of an elastic checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import check_output

__all__ = ["add_slice_parser", "run_slice"]


def add_slice_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `slice` subcommand on an `argparse` subparsers object."""
    parser = subparsers.add_parser(
        "slice",
        help="Write one nested variant of an elastic SlimMoe checkpoint as a standalone Hub-ready model "
        "(reads only that variant's slices).",
    )
    parser.add_argument("checkpoint", help="Elastic checkpoint: a local folder or a Hub repo id.")
    parser.add_argument("variant", help="Variant name from config.json 'elastic' (or 'full').")
    parser.add_argument("output", help="Output folder (written atomically).")
    parser.add_argument(
        "--to",
        dest="model_type",
        default=None,
        help="Export as this stock architecture (e.g. qwen3_moe) through hf_slim.convert.to_hf, where it can hold "
        "the variant; default: SlimMoe with remote code.",
    )
    parser.add_argument("--drop-mtp", action="store_true", help="Do not keep mtp.* tensors in a stock export.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder.")
    parser.set_defaults(handler=run_slice)
    return parser


def run_slice(args: argparse.Namespace) -> int:
    """Handler of `hf-slim slice`: partial load of the variant, then `hf_slim.hub.save_for_hub`."""
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from ..hub import save_for_hub
    from ..models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM
    from ..utils import count_parameters

    check_output(args.output, args.overwrite)
    config = SlimMoeConfig.from_pretrained(args.checkpoint)
    if args.model_type is not None:
        widths = config.variant_config(args.variant).moe_intermediate_size
        if isinstance(widths, list):
            raise ValueError(
                f"--to {args.model_type}: variant {args.variant!r} has per-layer moe_intermediate_size={widths}, but "
                "stock architectures hold one expert width for every layer; slice it without --to (SlimMoe with "
                "remote code)."
            )
    model = SlimMoeForCausalLM.from_pretrained(args.checkpoint, config=config, elastic_variant=args.variant)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    description = f"Variant `{args.variant}` sliced out of the elastic checkpoint `{args.checkpoint}` with `hf-slim slice`."
    folder = save_for_hub(
        model,
        args.output,
        model_type=args.model_type,
        keep_mtp=not args.drop_mtp,
        processing_class=tokenizer,
        card_kwargs={"description": description},
        overwrite=args.overwrite,
    )
    report = getattr(model, "elastic_load_report", None) or {}
    table = Table(title=f"hf-slim slice {args.variant}")
    table.add_column("")
    table.add_column("full")
    table.add_column(args.variant)
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_experts", "moe_intermediate_size"):
        table.add_row(key, str(getattr(config, key)), str(getattr(model.config, key)))
    counts = count_parameters(model)
    table.add_row("parameters (total / active)", "", f"{counts['total']:,} / {counts['active']:,}")
    if report:
        table.add_row("bytes read / checkpoint", f"{report.get('checkpoint_bytes', 0):,}", f"{report['bytes_read']:,}")
    Console().print(table)
    print(f"wrote {folder}")
    return 0
