"""The one error policy of `hf-slim`, applied once in [`hf_slim.cli.main`] around every sub-command.

- Bad input, which the user fixes, prints one line `hf-slim <command>: error: <message>` on stderr, no traceback,
  and exits with code 2 (argparse's code for a usage error). Bad input is:
  - `ValueError`, `TypeError`, `KeyError` (the errors the house rules give user input; `json.JSONDecodeError` and
    huggingface_hub's `HFValidationError`, a malformed Hub id, are `ValueError`s);
  - `OSError`: a missing or non-empty folder, no permission, a full disk, and huggingface_hub's errors for a Hub id
    or file that is not there or not reachable (`RepositoryNotFoundError`, `GatedRepoError`,
    `RevisionNotFoundError`, `LocalEntryNotFoundError`, `OfflineModeIsEnabled`, ...: all `OSError`s);
  - `FloatingPointError`, the base of hf-slim's own `NonFiniteGradientError` and `NonFiniteLossError` (training
    diverged), caught by that base so that the policy imports neither torch nor trl;
  - four library errors that derive from none of the above, named in [`BAD_INPUT_NAMES`] (matched by class name, so
    the policy imports none of those libraries): safetensors' `SafetensorError` (a damaged or truncated
    `.safetensors` file), PyYAML's `YAMLError` (a malformed YAML file), huggingface_hub's `EntryNotFoundError` (a
    file missing from a Hub repository) and its `StrictDataclassError` (a config field of the wrong type, e.g.
    `"vocab_size": "64"` in a config.json, naming the field).
  Nothing else is: a `RuntimeError` (torch's included), `AttributeError`, `IndexError`, `ImportError`, ... may be a
  bug, and a bug gets its traceback.
- The message is the error's text on one line, a `KeyError`'s without the quotes its `str` adds, in command-line
  words: every on/off switch of hf-slim is `--name` for the Python argument `name`, so `pass overwrite=True` reads
  `pass --overwrite`. A `SafetensorError` (`Error while deserializing header: ...`) or a `YAMLError` says what it is
  and, where its text does not, which file: the one the failing call was reading, taken from the traceback.
- Ctrl-C prints one line `hf-slim <command>: interrupted` and exits with code 130 (128 + SIGINT, as shells do).
- Anything else is a bug in hf-slim or below it: Python's traceback and exit code 1, to report it.
- `hf-slim --debug <command> ...` (before the command: after it, `--debug` is the command's, as `hf-slim distill`'s
  `TrainingArguments.debug`), or `HF_SLIM_TRACEBACK=1` in the environment, prints the traceback of bad input too
  (same line, same exit code).
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
    "BAD_INPUT_NAMES",
    "DEBUG_HELP",
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "add_debug_flag",
    "error_message",
    "is_bad_input",
    "run_command",
]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
BAD_INPUT: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError, FloatingPointError)
#: Library exceptions that are bad input (`module.qualname` of the class or a base) -> (what the message says first,
#: suffixes of the file the error is about, looked up in the traceback where the message does not name it).
BAD_INPUT_NAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "safetensors._safetensors_rust.SafetensorError": ("not a readable safetensors file", (".safetensors",)),
    "yaml.error.YAMLError": ("not valid YAML", (".yaml", ".yml")),
    "huggingface_hub.errors.EntryNotFoundError": ("", ()),
    "huggingface_hub.errors.StrictDataclassError": ("", ()),
}
DEBUG_HELP = "On bad input, print the traceback too (as HF_SLIM_TRACEBACK=1 does)."


def _library_names(error: BaseException) -> list[str]:
    return [f"{cls.__module__}.{cls.__qualname__}" for cls in type(error).__mro__ if cls.__module__ != "builtins"]


def is_bad_input(error: BaseException) -> bool:
    """Whether `error` is the user's to fix (one line, exit code 2) rather than a bug (traceback)."""
    return isinstance(error, BAD_INPUT) or any(name in BAD_INPUT_NAMES for name in _library_names(error))


def _file_in_traceback(error: BaseException, suffixes: tuple[str, ...]) -> str | None:
    """The existing file ending in one of `suffixes` that the innermost frame of `error`'s traceback holds in a local
    variable (the file the failing call was reading), or None."""
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, (str, os.PathLike)):
                path = os.fspath(value)
                if isinstance(path, str) and path.endswith(suffixes) and os.path.isfile(path):
                    return path
    return None


def error_message(error: BaseException, switches: Iterable[str] = ()) -> str:
    """The text of `error` on one line, with `name=True` written `--name` for each on/off switch `name`.

    Args:
        error: The exception.
        switches: Python names of the command's on/off flags (`overwrite` for `--overwrite`).

    Returns:
        `str`: the message (the exception's class name where it has no text); for the library errors of
        [`BAD_INPUT_NAMES`], prefixed with what went wrong, and with the file where the message does not name it.
    """
    if isinstance(error, KeyError) and len(error.args) == 1:
        message = str(error.args[0])  # str(KeyError) is the repr of its argument
    else:
        message = str(error)
    message = " ".join(message.split()) or type(error).__name__
    for name in switches:
        message = re.sub(rf"\b{re.escape(name)}=True\b", "--" + name.replace("_", "-"), message)
    what, suffixes = next((BAD_INPUT_NAMES[n] for n in _library_names(error) if n in BAD_INPUT_NAMES), ("", ()))
    if what:
        message = f"{what}: {message}"
    path = _file_in_traceback(error, suffixes) if suffixes else None
    if path is not None and path not in message and os.path.basename(path) not in message:
        message = f"{path}: {message}"
    return message


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Add `--debug` (see [`DEBUG_HELP`]) to the top-level parser: `hf-slim --debug prune ...`. Not to a sub-command,
    whose options may have their own `--debug` (`hf-slim distill --debug` is `TrainingArguments.debug`)."""
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("HF_SLIM_TRACEBACK", "") not in ("", "0")


def run_command(args: argparse.Namespace) -> int:
    """Call `args.handler(args)` under the policy above; return the exit code (a bug propagates).

    Args:
        args: Parsed arguments with `command` (the sub-command's name), `handler` and optionally `debug`.
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
        if _debug(args):
            traceback.print_exc()
        switches = [name for name, value in vars(args).items() if isinstance(value, bool) and name != "debug"]
        print(f"{prefix}: error: {error_message(error, switches)}", file=sys.stderr)
        return EXIT_BAD_INPUT
