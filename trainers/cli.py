"""Deprecated: `hf-slim distill` lives in [`hf_slim.cli.distill`]; this module only re-exports it."""

import warnings

from hf_slim.cli.distill import add_distill_parser, run_distill

__all__ = ["add_distill_parser", "run_distill"]

warnings.warn(
    "trainers.cli is deprecated; import add_distill_parser and run_distill from hf_slim.cli.distill.",
    FutureWarning,
    stacklevel=2,
)
