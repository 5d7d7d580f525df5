"""Version-sensitive touch points of transformers, one small module per concern.

- `transformers_optim`: make ``optim="aurora"`` / ``"aurora_lora"`` valid `TrainingArguments.optim` names
  (transformers has no public registry for optimizer names).
- `transformers_experts`: which experts implementation a MoE block dispatches to, and the grouped GEMM the
  calibration pass computes it with.

Each module lists at its top every transformers name it touches and why (``TOUCH_POINTS``), and
tests/test_transformers_touchpoints.py checks that each still has the shape relied on, so ``make test-latest``
flags a breaking transformers release before users meet it. A touch point that is gone raises
`TransformersCompatError` naming the transformers version and the internal. Nothing here imports transformers
at import time.
"""

from __future__ import annotations

import importlib.metadata


__all__ = ["TESTED_TRANSFORMERS", "TransformersCompatError", "transformers_version"]

TESTED_TRANSFORMERS = "5.24"
"""The transformers release the touch points were last checked against (the floor in setup.cfg)."""


class TransformersCompatError(RuntimeError):
    """A transformers internal hf-slim relies on is missing or no longer has the shape relied on."""

    def __init__(self, internal: str, problem: str, instead: str = "") -> None:
        message = (
            f"transformers {transformers_version()} {problem}: `{internal}` (hf-slim relies on it as of transformers "
            f"{TESTED_TRANSFORMERS}; see hf_slim/integrations)."
        )
        if instead:
            message += f" {instead}"
        super().__init__(message)
        self.internal = internal


def transformers_version() -> str:
    """The installed transformers version, read from package metadata (does not import transformers)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"
