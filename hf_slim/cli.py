"""The `hf-slim` command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _add_demo(subparsers) -> None:
    from .demo import DemoConfig

    parser = subparsers.add_parser("demo", help="Run the embedded end-to-end pipeline offline on CPU.")
    for field in dataclasses.fields(DemoConfig):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(field.default), default=field.default, help=f"(default: {field.default})")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}
    run_demo(DemoConfig(**fields))
    return 0


def _add_convert(subparsers) -> None:
    from .convert import SUPPORTED_MODEL_TYPES

    parser = subparsers.add_parser(
        "convert",
        help="Convert a local stock MoE checkpoint to SlimMoe (default) or a SlimMoe checkpoint to a stock family.",
    )
    parser.add_argument("model", help="Local checkpoint folder.")
    parser.add_argument("output", help="Output folder (written atomically).")
    parser.add_argument("--to", choices=("slim_moe", *SUPPORTED_MODEL_TYPES), default="slim_moe")
    parser.add_argument("--num-mtp-heads", type=int, default=0, help="MTP depths to add when converting to SlimMoe.")
    parser.add_argument("--drop-mtp", action="store_true", help="Do not keep mtp.* tensors in a stock export.")
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(handler=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .convert import from_hf
    from .hub import save_for_hub
    from .models.slim_moe import SlimMoeForCausalLM

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


def build_parser() -> argparse.ArgumentParser:
    from trainers.cli import add_distill_parser

    from .elastic.cli import add_slice_parser
    from .pruning.cli import add_prune_parser

    parser = argparse.ArgumentParser(prog="hf-slim", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
    _add_convert(subparsers)
    add_prune_parser(subparsers)
    add_slice_parser(subparsers)
    add_distill_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    import hf_slim  # noqa: F401  (registers the model family with the Auto classes)

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileExistsError, TypeError) as error:
        print(f"hf-slim {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
