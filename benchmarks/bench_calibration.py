"""Calibration overhead: `collect_statistics` vs a plain no-grad forward over the same batches, side by side.

Both passes run in the same process, interleaved round by round (the machines are noisy), on a randomly initialised
Qwen3-MoE-shaped model fed real text (Python standard-library sources, byte-level ids). The ratio is the median of
the per-round ratios. The plain forward runs twice: with the model's default experts implementation
(`grouped_mm`, what users get) and with transformers' `eager` loop (the arithmetic the calibration pass mirrors).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_calibration.py [--write-docs]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import statistics
import textwrap
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from hf_slim.pruning import collect_statistics

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "pruning.md")
BEGIN, END = "<!-- bench_calibration:begin -->", "<!-- bench_calibration:end -->"


def build(hidden: int, layers: int, experts: int, topk: int, vocab: int):
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, head_dim=hidden // 8, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_experts=experts, num_experts_per_tok=topk, norm_topk_prob=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    return model


def text_ids(n: int, length: int, vocab: int) -> torch.Tensor:
    src = "".join(inspect.getsource(m) for m in (json, textwrap, inspect, argparse, statistics))
    ids = [b % vocab for b in src.encode()]
    if len(ids) < n * length:
        raise SystemExit(f"not enough text for {n} x {length} tokens")
    return torch.tensor(ids[: n * length]).view(n, length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.hidden, args.layers, args.experts, args.topk, args.vocab)
    ids = text_ids(args.samples, args.length, args.vocab)
    batches = ids.split(args.batch_size)

    @torch.no_grad()
    def plain(impl: str) -> float:
        model.config._experts_implementation = impl
        for layer in model.model.layers:
            layer.mlp.experts.config._experts_implementation = impl
        t = time.perf_counter()
        for b in batches:
            model(input_ids=b, use_cache=False)
        return time.perf_counter() - t

    default_impl = model.config._experts_implementation

    def calib() -> float:
        t = time.perf_counter()
        collect_statistics(model, ids, num_samples=args.samples, max_length=args.length,
                           batch_size=args.batch_size, show_progress=False)
        return time.perf_counter() - t

    plain(default_impl), calib()  # warm-up
    rows = {"default": [], "eager": [], "calib": []}
    for _ in range(args.rounds):
        rows["default"].append(plain(default_impl))
        rows["eager"].append(plain("eager"))
        model.config._experts_implementation = default_impl
        rows["calib"].append(calib())
    med = {k: statistics.median(v) for k, v in rows.items()}
    per_default = [c / d for c, d in zip(rows["calib"], rows["default"])]
    per_eager = [c / e for c, e in zip(rows["calib"], rows["eager"])]
    ratio_default, ratio_eager = statistics.median(per_default), statistics.median(per_eager)
    tokens = ids.numel()
    cmd = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_calibration.py" + (" --write-docs" if args.write_docs else "")
    table = "\n".join([
        f"Command: `{cmd}` (model: qwen3_moe, hidden {args.hidden}, {args.layers} layers, {args.experts} experts, "
        f"top-{args.topk}; {args.samples} x {args.length} tokens of stdlib source, batch {args.batch_size}; "
        f"median of {args.rounds} interleaved rounds).",
        "",
        f"Hardware: {platform.processor() or platform.machine()}, {args.threads} torch threads, "
        f"{os.cpu_count()} visible CPUs. Versions: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        "| pass | median seconds | tokens/s | calibration time / this pass (median of rounds) | per-round range |",
        "|---|---|---|---|---|",
        f"| plain no-grad forward, experts `{default_impl}` (default) | {med['default']:.3f} | "
        f"{tokens / med['default']:,.0f} | **{ratio_default:.2f}x** | {min(per_default):.2f}-{max(per_default):.2f} |",
        f"| plain no-grad forward, experts `eager` | {med['eager']:.3f} | {tokens / med['eager']:,.0f} | "
        f"{ratio_eager:.2f}x | {min(per_eager):.2f}-{max(per_eager):.2f} |",
        f"| `collect_statistics` (all statistics) | {med['calib']:.3f} | {tokens / med['calib']:,.0f} | 1.00x | |",
        "",
        "Per-round seconds (default / eager / calibration): "
        + "; ".join(f"{d:.2f} / {e:.2f} / {c:.2f}" for d, e, c in zip(rows["default"], rows["eager"], rows["calib"])),
    ])
    print(table)
    if args.write_docs:
        with open(DOC, encoding="utf-8") as f:
            doc = f.read()
        block = f"{BEGIN}\n{table}\n{END}"
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
        tmp = DOC + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(doc)
        os.replace(tmp, DOC)


if __name__ == "__main__":
    main()
