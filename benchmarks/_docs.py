"""Shared by the benchmarks: write a measured table into a docs/ page between two HTML-comment markers."""

from __future__ import annotations

import os
from pathlib import Path


def write_marked_block(path: str | os.PathLike, begin: str, end: str, body: str, title: str) -> None:
    """Replace the text between `begin` and `end` in `path` with `body` (the markers stay), atomically.

    A page without the markers gets the block appended; a missing page is created with `title` as its heading.
    """
    path = Path(path)
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else f"# {title}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
