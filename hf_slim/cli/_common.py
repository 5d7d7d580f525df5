"""What the sub-commands share: one-line usage errors, options added on first use, and the output-folder check worded
for the flag."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "TOKENIZER_FILES", "CommandParser", "SubcommandParser", "add_options", "check_output", "encodes_text",
    "has_tokenizer_files",
]  # fmt: skip

AddOptions = Callable[[argparse.ArgumentParser], None]


class CommandParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose usage errors are one line, as every `hf-slim` error (see [`hf_slim.cli.errors`]):
    `hf-slim prune: error: <what> (see `hf-slim prune --help`)`, exit code 2, instead of the usage and the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


class SubcommandParser(CommandParser):
    """A [`CommandParser`] that adds its deferred options the first time it parses or formats its help.

    A sub-command whose options come from a module importing torch or transformers (a config dataclass) defers
    them, so that `hf-slim --help` and the other sub-commands do not import that module.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[AddOptions] = []

    def defer(self, add: AddOptions) -> None:
        """Call `add(self)` before the first parse, usage or help."""
        self._deferred.append(add)

    def _add_deferred(self) -> None:
        while self._deferred:
            self._deferred.pop(0)(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._add_deferred()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._add_deferred()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_deferred()
        return super().format_help()


def add_options(parser: argparse.ArgumentParser, add: AddOptions) -> None:
    """`add(parser)` on first use where `parser` is a [`SubcommandParser`] (as in `hf-slim`), otherwise now."""
    if isinstance(parser, SubcommandParser):
        parser.defer(add)
    else:
        add(parser)


def check_output(output: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a non-empty output folder before anything loads, naming the `--overwrite` flag.

    Raises:
        `FileExistsError`: `output` exists, is not empty and `overwrite` is off.
    """
    path = Path(output)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output={output}: folder exists and is not empty; pass --overwrite to replace it")


def encodes_text(tokenizer: Any) -> bool:
    """Whether `tokenizer` has a vocabulary: transformers builds a tokenizer even for a folder with no tokenizer
    files, holding only the family's special tokens (1 for Qwen, 2 for OLMoE), which encodes any text to nothing."""
    return bool(tokenizer("Hello, world.", add_special_tokens=False)["input_ids"])


#: Files one of which a folder holds when it has a tokenizer (transformers' names, slow and fast; or a *.tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")  # fmt: skip


def has_tokenizer_files(folder: Path | None) -> bool:
    if folder is None:
        return False
    folder = Path(folder)
    return any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken"))
