"""The `hf-slim` command line: one module per sub-command, one error policy ([`hf_slim.cli.errors`]).

| command   | module                 | does                                                         |
|-----------|------------------------|--------------------------------------------------------------|
| `demo`    | `hf_slim.cli.demo`     | the embedded end-to-end pipeline, offline on CPU             |
| `convert` | `hf_slim.cli.convert`  | stock MoE checkpoint <-> SlimMoe                             |
| `prune`   | `hf_slim.cli.prune`    | calibrate and prune into a smaller checkpoint, same family   |
| `slice`   | `hf_slim.cli.slice`    | one nested variant of an elastic checkpoint, standalone      |
| `distill` | `hf_slim.cli.distill`  | progressive prune -> distill stages from a YAML config       |
| `teacher-logits` | `hf_slim.cli.teacher_logits` | a teacher's top-k per position to disk (offline teacher) |
| `push`    | `hf_slim.cli.push`     | upload a Hub-ready folder, its card re-rendered for the repo id |
| `trl`     | `hf_slim.cli.trl`      | TRL's scripts and CLI (`trl sft ...`) with `--optim aurora` / `aurora_lora` |

Building the parser imports no torch, transformers or trl (nor does `import hf_slim`, which the console script runs
first): each command imports what it needs when it runs, and options that mirror a config dataclass come from a
generated table (`hf_slim.cli._static`), so `--help` stays quick. `hf-slim --debug <command>` shows tracebacks.
"""

from __future__ import annotations

import argparse

from ._common import CommandParser, SubcommandParser
from .convert import add_convert_parser
from .demo import add_demo_parser
from .distill import add_distill_parser
from .errors import add_debug_flag, run_command
from .prune import add_prune_parser
from .push import add_push_parser
from .slice import add_slice_parser
from .teacher_logits import add_teacher_logits_parser
from .trl import add_trl_parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The `hf-slim` parser; `parse_args` gives `args.command` and `args.handler` (which returns the exit code)."""
    parser = CommandParser(prog="hf-slim", description="The `hf-slim` command line.")
    add_debug_flag(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)
    add_demo_parser(subparsers)
    add_convert_parser(subparsers)
    add_prune_parser(subparsers)
    add_slice_parser(subparsers)
    add_distill_parser(subparsers)
    add_teacher_logits_parser(subparsers)
    add_push_parser(subparsers)
    add_trl_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `hf-slim` on `argv` (default: `sys.argv[1:]`); returns the exit code (see [`hf_slim.cli.errors`])."""
    args = build_parser().parse_args(argv)
    from .. import register_with_transformers

    register_with_transformers()  # SlimMoe's Auto classes and optim="aurora", as `import hf_slim` arranges
    return run_command(args)

