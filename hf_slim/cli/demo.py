"""`hf-slim demo`: the embedded end-to-end pipeline, offline on CPU (flags mirror `hf_slim.demo.DemoConfig`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ._common import add_options

__all__ = ["add_demo_parser", "run_demo"]


def _add_demo_options(parser: argparse.ArgumentParser) -> None:
    from ..demo import DemoConfig

    for field in dataclasses.fields(DemoConfig):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(field.default), default=field.default, help=f"(default: {field.default})")


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `demo` sub-command to an `argparse` sub-parsers object (the handler is in `args.handler`)."""
    parser = subparsers.add_parser("demo", help="Run the embedded end-to-end pipeline offline on CPU.")
    add_options(parser, _add_demo_options)
    parser.set_defaults(handler=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Handler of `hf-slim demo`: [`hf_slim.demo.run_demo`] with the flags as its `DemoConfig`."""
    from ..demo import DemoConfig
    from ..demo import run_demo as run_pipeline

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}
    run_pipeline(DemoConfig(**fields))
    return 0
