"""Calibration overhead: `collect_statistics` vs a plain no-grad forward over the same batches, side by side.

Both passes run in the same process, interleaved round by round (the machines are noisy), on a randomly initialised
Qwen3-MoE-shaped model fed real text (Python standard-library sources, byte-level ids). Each pass records wall time
and this process's CPU time (`time.process_time`, all threads), which other jobs on a shared machine disturb far
less; the headline ratio is the ratio of the fastest rounds (min is the usual estimate of undisturbed time). The plain forward runs twice: with the model's default experts implementation
(`grouped_mm`, what users get) and with transformers' `eager` loop (the arithmetic the calibration pass mirrors).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_calibration.py [--write-docs]

With `--quality` it instead trains a small Qwen3-MoE on real local text (standard-library docstrings, byte-level BPE
from `hf_slim.data`), calibrates it, and reports held-out loss right after pruning for depth `last` vs
`block_influence` and for every expert strategy at 50% of the experts, with the pruning wall time:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_calibration.py --quality [--write-docs]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shlex
import statistics
import textwrap
import time

import torch
import transformers
from _docs import write_marked_block
from transformers import AutoConfig, AutoModelForCausalLM

from hf_slim.pruning import collect_statistics

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "pruning.md")
BEGIN, END = "<!-- bench_calibration:begin -->", "<!-- bench_calibration:end -->"
QBEGIN, QEND = "<!-- bench_pruning_quality:begin -->", "<!-- bench_pruning_quality:end -->"
SCRIPT = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_calibration.py"


def command_line(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> str:
    """The command that reproduces this run: the script with every option whose value is not its default
    (`--quality` first, `--write-docs` last), so a table written into the docs names the run that made it."""
    parser = parser or build_parser()
    first, middle, last = [], [], []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # store_true
            (first if action.dest == "quality" else last if action.dest == "write_docs" else middle).append(flag)
        else:
            middle.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join([SCRIPT, *first, *middle, *last])


def quality(args: argparse.Namespace) -> str:
    """Train a small MoE on stdlib docstrings, then compare pruning recipes by held-out loss (no recovery)."""
    from hf_slim.data import packed_lm_dataset, stdlib_corpus, train_tokenizer
    from hf_slim.pruning import PruneConfig, prune

    torch.manual_seed(0)
    docs = stdlib_corpus()
    split = int(len(docs) * 0.9)
    tok = train_tokenizer(docs[:split], vocab_size=args.vocab_q)
    train = torch.tensor(packed_lm_dataset(docs[:split], tok, args.length_q)["input_ids"])
    held = torch.tensor(packed_lm_dataset(docs[split:], tok, args.length_q)["input_ids"])[: args.eval_blocks]
    calib = train[: args.samples_q]
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=len(tok), hidden_size=args.hidden_q, num_hidden_layers=args.layers_q,
        num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden_q // 4, intermediate_size=2 * args.hidden_q,
        moe_intermediate_size=args.hidden_q // 2, num_experts=args.experts_q, num_experts_per_tok=2,
        norm_topk_prob=True, router_aux_loss_coef=0.01, output_router_logits=True, tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, train.shape[0], (args.batch_q,))
        loss = model(input_ids=train[idx], labels=train[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    train_s = time.perf_counter() - t0
    model.eval()
    model.config.output_router_logits = False

    @torch.no_grad()
    def held_loss(m) -> float:
        return float(torch.stack([m(input_ids=b, labels=b).loss for b in held.split(8)]).mean())

    t0 = time.perf_counter()
    stats = collect_statistics(model, calib, num_samples=calib.shape[0], max_length=calib.shape[1], batch_size=8,
                               show_progress=False)
    calib_s = time.perf_counter() - t0
    half = args.experts_q // 2
    recipes = [
        ("source model", None),
        ("depth -25%, `last`", PruneConfig(num_hidden_layers=0.75, depth_method="last")),
        ("depth -25%, `block_influence`", PruneConfig(num_hidden_layers=0.75, depth_method="block_influence")),
    ] + [
        (f"experts {args.experts_q} -> {half}, `{s}`", PruneConfig(num_experts=half, expert_strategy=s))
        for s in ("frequency", "soft", "reap", "merge", "partial_preserve")
    ] + [
        ("hidden -25% (`slimqwen`)", PruneConfig(hidden_size=0.75)),
        ("hidden -25% (`minitron`)", PruneConfig(hidden_size=0.75, hidden_method="minitron")),
        ("expert width -50%", PruneConfig(moe_intermediate_size=0.5)),
    ]
    rows = []
    for name, cfg in recipes:
        t0 = time.perf_counter()
        pruned = model if cfg is None else prune(model, cfg, stats)
        prune_s = time.perf_counter() - t0
        rows.append(f"| {name} | {held_loss(pruned):.3f} | {'' if cfg is None else f'{prune_s:.2f}'} |")
    cmd = command_line(args)
    return "\n".join([
        f"Command: `{cmd}`. Model: qwen3_moe, hidden {args.hidden_q}, {args.layers_q} layers, {args.experts_q} "
        f"experts (top-2), vocabulary {len(tok)} (byte-level BPE), trained {args.steps} steps x {args.batch_q} x "
        f"{args.length_q} tokens on 90% of the stdlib docstrings ({train_s:.0f} s); calibration "
        f"{calib.shape[0]} x {calib.shape[1]} tokens ({calib_s:.2f} s); loss on {held.shape[0]} held-out blocks "
        "(the other 10%), right after pruning, no recovery training.",
        "",
        f"Hardware: {platform.machine()}, {args.threads} torch threads. Versions: torch {torch.__version__}, "
        f"transformers {transformers.__version__}.",
        "",
        "| recipe | held-out loss | pruning wall s |",
        "|---|---|---|",
        *rows,
    ])


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


def build_parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--quality", action="store_true", help="run the pruning-quality benchmark instead")
    ap.add_argument("--hidden-q", type=int, default=128)
    ap.add_argument("--layers-q", type=int, default=4)
    ap.add_argument("--experts-q", type=int, default=16)
    ap.add_argument("--vocab-q", type=int, default=1024)
    ap.add_argument("--length-q", type=int, default=128)
    ap.add_argument("--batch-q", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--samples-q", type=int, default=64)
    ap.add_argument("--eval-blocks", type=int, default=64)
    return ap


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    if args.quality:
        table = quality(args)
        print(table)
        if args.write_docs:
            write_marked_block(DOC, QBEGIN, QEND, table, "Structured pruning")
        return
    model = build(args.hidden, args.layers, args.experts, args.topk, args.vocab)
    ids = text_ids(args.samples, args.length, args.vocab)
    batches = ids.split(args.batch_size)

    default_impl = model.config._experts_implementation

    @torch.no_grad()
    def plain(impl: str) -> tuple[float, float]:
        model.config._experts_implementation = impl  # the experts read the model's config at call time
        w, c = time.perf_counter(), time.process_time()
        for b in batches:
            model(input_ids=b, use_cache=False)
        out = time.perf_counter() - w, time.process_time() - c
        model.config._experts_implementation = default_impl
        return out

    def calib() -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        collect_statistics(model, ids, num_samples=args.samples, max_length=args.length,
                           batch_size=args.batch_size, show_progress=False)
        return time.perf_counter() - w, time.process_time() - c

    plain(default_impl), calib()  # warm-up
    wall = {"default": [], "eager": [], "calib": []}
    cpu = {"default": [], "eager": [], "calib": []}
    for _ in range(args.rounds):
        for key, fn in (("default", lambda: plain(default_impl)), ("eager", lambda: plain("eager")), ("calib", calib)):
            w, c = fn()
            wall[key].append(w)
            cpu[key].append(c)
    best = {k: min(v) for k, v in wall.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    per_default = [c / d for c, d in zip(wall["calib"], wall["default"])]
    tokens = ids.numel()
    cmd = command_line(args)
    table = "\n".join([
        f"Command: `{cmd}` (model: qwen3_moe, hidden {args.hidden}, {args.layers} layers, {args.experts} experts, "
        f"top-{args.topk}; {args.samples} x {args.length} tokens of stdlib source, batch {args.batch_size}; "
        f"best of {args.rounds} interleaved rounds).",
        "",
        f"Hardware: {platform.processor() or platform.machine()}, {args.threads} torch threads, "
        f"{os.cpu_count()} visible CPUs. Versions: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        "| pass | best wall s | tokens/s | calibration / this (best wall) | best CPU s | calibration / this (best CPU) |",
        "|---|---|---|---|---|---|",
        f"| plain no-grad forward, experts `{default_impl}` (default) | {best['default']:.3f} | "
        f"{tokens / best['default']:,.0f} | **{best['calib'] / best['default']:.2f}x** | {best_cpu['default']:.2f} | "
        f"**{best_cpu['calib'] / best_cpu['default']:.2f}x** |",
        f"| plain no-grad forward, experts `eager` | {best['eager']:.3f} | {tokens / best['eager']:,.0f} | "
        f"{best['calib'] / best['eager']:.2f}x | {best_cpu['eager']:.2f} | {best_cpu['calib'] / best_cpu['eager']:.2f}x |",
        f"| `collect_statistics` (all statistics) | {best['calib']:.3f} | {tokens / best['calib']:,.0f} | 1.00x | "
        f"{best_cpu['calib']:.2f} | 1.00x |",
        "",
        f"Per-round wall ratio calibration / default: median {statistics.median(per_default):.2f}x, range "
        f"{min(per_default):.2f}-{max(per_default):.2f} (the spread is other jobs on the shared machine). Per-round "
        "wall seconds (default / eager / calibration): "
        + "; ".join(f"{d:.2f} / {e:.2f} / {c:.2f}" for d, e, c in zip(wall["default"], wall["eager"], wall["calib"])),
    ])
    print(table)
    if args.write_docs:
        write_marked_block(DOC, BEGIN, END, table, "Structured pruning")


if __name__ == "__main__":
    main()
