"""The one error policy of `hf-slim`, applied once in [`hf_slim.cli.main`] around every sub-command.

- Bad input, which the user fixes, prints one line `hf-slim <command>: error: <message>` on stderr, no traceback,
  and exits with code 2 (argparse's code for a usage error). Bad input is `ValueError`, `TypeError`, `KeyError` (the
  errors the house rules give user input); `OSError` (a missing or non-empty folder, a wrong Hub id, the Hub out of
  reach, no permission: transformers and huggingface_hub word these for the user); and `FloatingPointError`, the
  base of hf-slim's own `NonFiniteGradientError` and `NonFiniteLossError` (training diverged), caught by that base
  so that the policy imports neither torch nor trl.
- The message is the error's text on one line, a `KeyError`'s without the quotes its `str` adds, in command-line
  words: every on/off switch of hf-slim is `--name` for the Python argument `name`, so `pass overwrite=True` reads
  `pass --overwrite`.
- Ctrl-C prints one line `hf-slim <command>: interrupted` and exits with code 130 (128 + SIGINT, as shells do).
- Anything else is a bug in hf-slim or below it: Python's traceback and exit code 1, to report it.
- `HF_SLIM_TRACEBACK=1` in the environment prints the traceback of bad input too (same line, same exit code).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections.abc import Iterable

__all__ = [
    "BAD_INPUT",
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "error_message",
    "is_bad_input",
    "run_command",
]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
BAD_INPUT: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError, FloatingPointError)


def is_bad_input(error: BaseException) -> bool:
    """Whether `error` is the user's to fix (one line, exit code 2) rather than a bug (traceback)."""
    return isinstance(error, BAD_INPUT)


def error_message(error: BaseException, switches: Iterable[str] = ()) -> str:
    """The text of `error` on one line, with `name=True` written `--name` for each on/off switch `name`.

    Args:
        error: The exception.
        switches: Python names of the command's on/off flags (`overwrite` for `--overwrite`).

    Returns:
        `str`: the message (the exception's class name where it has no text).
    """
    if isinstance(error, KeyError) and len(error.args) == 1:
        message = str(error.args[0])  # str(KeyError) is the repr of its argument
    else:
        message = str(error)
    message = " ".join(message.split()) or type(error).__name__
    for name in switches:
        message = re.sub(rf"\b{re.escape(name)}=True\b", "--" + name.replace("_", "-"), message)
    return message


def run_command(args: argparse.Namespace) -> int:
    """Call `args.handler(args)` under the policy above; return the exit code (a bug propagates).

    Args:
        args: Parsed arguments with `command` (the sub-command's name) and `handler`.
    """
    prefix = f"hf-slim {args.command}"
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if not is_bad_input(error):
            raise
        if os.environ.get("HF_SLIM_TRACEBACK", "") not in ("", "0"):
            traceback.print_exc()
        switches = [name for name, value in vars(args).items() if isinstance(value, bool)]
        print(f"{prefix}: error: {error_message(error, switches)}", file=sys.stderr)
        return EXIT_BAD_INPUT
