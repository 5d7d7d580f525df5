"""Offline text and tokenizer for demos and tests.

The corpus is the documentation of the Python standard library, read from the running interpreter with
`inspect.getdoc`: real English technical prose present on every machine with Python (PSF licence), so nothing is
downloaded. The tokenizer is a byte-level BPE trained on it with the `tokenizers` library.
"""

from __future__ import annotations

import importlib
import inspect

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


STDLIB_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email",
    "enum", "filecmp", "fnmatch", "fractions", "functools", "gettext", "glob", "graphlib", "gzip", "heapq", "hmac",
    "html.parser", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "mimetypes",
    "numbers", "operator", "pathlib", "pdb", "pickle", "platform", "pprint", "queue", "random", "re", "reprlib",
    "sched", "secrets", "shlex", "shutil", "socket", "sqlite3", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "typing", "unittest",
    "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zoneinfo",
)  # fmt: skip
SPECIAL_TOKENS = ("<|endoftext|>", "<pad>", "<think>", "</think>")


def stdlib_corpus(max_documents: int | None = None, min_chars: int = 80) -> list[str]:
    """Docstrings of the standard-library modules above and their public members, de-duplicated, in a fixed order.

    Args:
        max_documents: Keep only the first N documents.
        min_chars: Skip docstrings shorter than this.
    """
    seen: set[str] = set()
    documents: list[str] = []
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        members = [("", module)] + sorted(
            (name, obj) for name, obj in vars(module).items() if not name.startswith("_")
        )
        for _, obj in members:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                documents.append(doc)
                if max_documents is not None and len(documents) >= max_documents:
                    return documents
    return documents


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers fast tokenizer.

    Special tokens: `<|endoftext|>` (bos/eos), `<pad>`, and `<think>`/`</think>` for reasoning traces.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} for byte-level BPE, got {vocab_size}.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=["<think>", "</think>"],
    )


def packed_lm_dataset(texts: list[str], tokenizer: PreTrainedTokenizerFast, block_size: int) -> Dataset:
    """Tokenize `texts`, join them with EOS and cut the stream into `block_size` blocks (`input_ids` column)."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}.")
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    return Dataset.from_dict({"input_ids": blocks})


__all__ = ["SPECIAL_TOKENS", "STDLIB_MODULES", "packed_lm_dataset", "stdlib_corpus", "train_tokenizer"]


STDLIB_DATASET = "hf_slim:stdlib"  # the offline corpus above, as a dataset name
LOCAL_DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_training_dataset(
    name: str,
    tokenizer: PreTrainedTokenizerFast,
    max_length: int,
    config: str | None = None,
    split: str = "train",
    field: str = "dataset_name",
) -> tuple[Dataset, list[str] | Dataset]:
    """The dataset a distillation run (or its offline teacher) reads, by name, and its calibration data.

    Args:
        name: `"hf_slim:stdlib"` (the offline corpus, packed into `max_length`-token rows), a local `.json` /
            `.jsonl` / `.csv` / `.parquet` / `.txt` file, or a Hub dataset.
        tokenizer: Tokenizer of the packed offline corpus.
        max_length: Row length of the packed offline corpus.
        config: Hub dataset configuration.
        split: Hub dataset split.
        field: The option's name, for the error message.

    Returns:
        `(dataset, calibration)`: the dataset, and the texts (offline corpus) or the dataset itself.
    """
    from pathlib import Path

    from datasets import load_dataset

    if name == STDLIB_DATASET:
        texts = stdlib_corpus()
        return packed_lm_dataset(texts, tokenizer, max_length), texts
    suffix = Path(name).suffix.lower()
    if Path(name).is_file():
        if suffix not in LOCAL_DATA_BUILDERS:
            raise ValueError(
                f"{field}={name!r}: local files must be one of {sorted(LOCAL_DATA_BUILDERS)}, got {suffix!r}."
            )
        dataset = load_dataset(LOCAL_DATA_BUILDERS[suffix], data_files=name, split="train")
    else:
        dataset = load_dataset(name, config, split=split)
    return dataset, dataset
