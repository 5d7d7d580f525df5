"""Deprecated: `hf-slim prune` lives in [`hf_slim.cli.prune`]; this module only re-exports it."""

import warnings

from ..cli.prune import (
    add_prune_parser,
    before_after_table,
    read_calibration_texts,
    run_prune,
)

__all__ = ["add_prune_parser", "before_after_table", "read_calibration_texts", "run_prune"]

warnings.warn(
    "hf_slim.pruning.cli is deprecated; import add_prune_parser, run_prune, read_calibration_texts and "
    "before_after_table from hf_slim.cli.prune.",
    FutureWarning,
    stacklevel=2,
)
