"""Deprecated: `hf-slim slice` lives in [`hf_slim.cli.slice`]; this module only re-exports it."""

import warnings

from ..cli.slice import add_slice_parser, run_slice

__all__ = ["add_slice_parser", "run_slice"]

warnings.warn(
    "hf_slim.elastic.cli is deprecated; import add_slice_parser and run_slice from hf_slim.cli.slice.",
    FutureWarning,
    stacklevel=2,
)
