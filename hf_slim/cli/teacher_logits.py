"""`hf-slim teacher-logits TEACHER DATASET OUTPUT`: run a teacher once and write its top-k per position to disk, the
training data of a distillation run with no teacher in memory (`SlimDistillationConfig.teacher_logits_dir`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import encodes_text, has_tokenizer_files

__all__ = ["add_teacher_logits_parser", "run_teacher_logits"]


def add_teacher_logits_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `teacher-logits` subcommand on an `argparse` subparsers object."""
    parser = subparsers.add_parser(
        "teacher-logits",
        help="Write a teacher's top-k log-probabilities of every position of a dataset to sharded safetensors "
        "(resumable), for distillation with no teacher in memory.",
    )
    parser.add_argument("teacher", help="Teacher: a local folder or a Hub repo id.")
    parser.add_argument(
        "dataset",
        help="'hf_slim:stdlib' (the offline corpus, packed), a local .json/.jsonl/.csv/.parquet/.txt file, or a Hub "
        "dataset with input_ids, text or messages rows.",
    )
    parser.add_argument("output", help="Output folder (run the same command again to resume an unfinished one).")
    parser.add_argument("--top-k", type=int, default=32, help="Tokens kept per position (default: 32).")
    parser.add_argument("--max-length", type=int, default=1024, help="Rows are truncated to it; use the training "
                        "run's max_length (default: 1024).")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per teacher forward (default: 8).")
    parser.add_argument("--tokenizer", help="Tokenizer folder or Hub id (default: the teacher's).")
    parser.add_argument("--text-column", default="text", help="Text column of the dataset (default: text).")
    parser.add_argument("--dataset-config", help="Hub dataset configuration.")
    parser.add_argument("--split", default="train", help="Hub dataset split (default: train).")
    parser.add_argument("--dtype", default="auto", help="Teacher dtype: auto (stored), float32, bfloat16, float16.")
    parser.add_argument("--quantization", choices=["4bit", "8bit"], help="Load the teacher quantized (bitsandbytes).")
    parser.add_argument(
        "--layerwise",
        action="store_true",
        help="Read the teacher one decoder block at a time from its checkpoint (for a teacher larger than memory).",
    )
    parser.add_argument("--rows-per-pass", type=int, default=256, help="With --layerwise: rows per pass over the "
                        "checkpoint (each pass reads it once; default: 256).")  # fmt: skip
    parser.add_argument("--max-memory", help="With --layerwise: host memory for the hidden states, e.g. 20GB "
                        "(default: the available RAM; beyond it they spill to a temporary file).")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="Device to run the teacher on (default: cpu).")
    parser.add_argument("--log-prob-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="Stored dtype of the log-probabilities (default: float32).")  # fmt: skip
    parser.add_argument("--max-shard-size", default="2GB", help="Shard size; bounds the rows held in memory.")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow the teacher's remote code.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a folder that holds other logits.")
    parser.set_defaults(handler=run_teacher_logits)
    return parser


def _dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return "auto"
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}.")
    return value


def run_teacher_logits(args: argparse.Namespace) -> int:
    """Handler of `hf-slim teacher-logits`: load the tokenizer, the dataset and the teacher, write the folder and
    print what it holds."""
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from ..data import load_training_dataset
    from ..teacher_logits import write_teacher_logits
    from ..teacher_logits.writer import check_output_folder
    from ..utils import format_bytes

    dtype = _dtype(args.dtype)
    for flag in ("top_k", "max_length", "batch_size", "rows_per_pass"):
        if getattr(args, flag) < 1 or (flag == "max_length" and args.max_length < 2):
            least = 2 if flag == "max_length" else 1
            raise ValueError(f"--{flag.replace('_', '-')} must be an integer >= {least}, got {getattr(args, flag)}.")
    if not args.layerwise and (args.max_memory is not None or args.rows_per_pass != 256):
        raise ValueError("--rows-per-pass and --max-memory apply to a --layerwise teacher only; add --layerwise.")
    if args.quantization and args.layerwise:
        raise ValueError("--quantization and --layerwise cannot be combined: a layer-by-layer teacher is read as stored.")
    for flag in ("teacher", "tokenizer"):
        path = getattr(args, flag)
        if path is not None and not Path(path).exists() and (Path(path).is_absolute() or str(path).startswith(".")):
            raise FileNotFoundError(f"{flag} {path!r}: no such local folder; give an existing folder or a Hub model id.")
    # the settings an existing folder must share, checked before anything loads
    check_output_folder(args.output, args.overwrite, teacher=args.teacher, top_k=args.top_k,
                        max_length=args.max_length, log_prob_dtype=args.log_prob_dtype)  # fmt: skip
    source = args.tokenizer or args.teacher
    if Path(source).is_dir() and not has_tokenizer_files(source):
        raise ValueError(
            f"{source} has no tokenizer files (tokenizer.json / tokenizer_config.json) to encode the dataset; pass "
            "--tokenizer or add them."
        )
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)
    if not encodes_text(tokenizer):
        raise ValueError(
            f"{args.tokenizer or args.teacher} has no tokenizer files (tokenizer.json / tokenizer_config.json) to "
            "encode the dataset; pass --tokenizer or add them."
        )
    dataset, _ = load_training_dataset(
        args.dataset, tokenizer, args.max_length, args.dataset_config, args.split, field="dataset"
    )
    common = dict(
        tokenizer=tokenizer, top_k=args.top_k, max_length=args.max_length, batch_size=args.batch_size,
        max_shard_size=args.max_shard_size, log_prob_dtype=args.log_prob_dtype, dataset_text_field=args.text_column,
        teacher_name=args.teacher, overwrite=args.overwrite,
    )  # fmt: skip
    if args.layerwise:
        from ..teacher_logits import LayerwiseTeacher

        teacher = LayerwiseTeacher(
            args.teacher, dtype=None if dtype == "auto" else dtype, device=args.device,
            rows_per_pass=args.rows_per_pass, max_memory=args.max_memory,
        )  # fmt: skip
    else:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": args.trust_remote_code}
        if args.quantization:
            from trainers.teacher import teacher_quantization_config

            kwargs["quantization_config"] = teacher_quantization_config(args.quantization)
        else:
            kwargs["device_map"] = args.device
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, **kwargs)
    reader = write_teacher_logits(teacher, dataset, args.output, **common)
    tokens = sum(s["num_tokens"] for s in reader.shards)
    size = sum(s["bytes"] for s in reader.shards)
    table = Table(title=f"hf-slim teacher-logits {args.output}")
    table.add_column("")
    table.add_column("value")
    for key, value in (
        ("rows / tokens", f"{reader.num_rows:,} / {tokens:,}"),
        ("top-k / log-prob dtype", f"{reader.top_k} / {reader.meta['log_prob_dtype']}"),
        ("shards / bytes", f"{len(reader.shards)} / {format_bytes(size)}"),
        ("bytes per token", f"{size / max(tokens, 1):.1f}"),
    ):
        table.add_row(key, value)
    Console().print(table)
    print(f"wrote {args.output}")
    return 0
