"""SlimMoe vs stock Qwen3MoeForCausalLM of identical config: forward+backward and greedy decode, side by side.

The two models share every weight (SlimMoe is built with `hf_slim.convert.from_hf`), run the same inputs, and are
timed in alternation (A, B, A, B, ...) so machine noise hits both alike; the ratio SlimMoe / stock is the result
(target <= 1.05). Writes docs/benchmark_slim_moe.md.

    python benchmarks/bench_slim_moe.py [--repeats 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hf_slim.convert import from_hf  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads; 1 by default because on a shared 2-core machine a second thread waits on the other "
        "core's load and inflates times tenfold",
    )
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent.parent / "docs" / "benchmark_slim_moe.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = args.device
    # A Qwen3-30B-A3B-shaped layer stack scaled down to run on a laptop CPU: 48 -> 4 layers, hidden 2048 -> 512,
    # 128 experts (top-8) of width 768 -> 64 experts of width 192.
    config = Qwen3MoeConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=192,
        norm_topk_prob=True, max_position_embeddings=2048,
    )
    stock = Qwen3MoeForCausalLM(config).to(device)
    slim = from_hf(stock).to(device)
    stock.train()
    slim.train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    prompt = ids[:1, :32]

    def train_step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()

        return run

    def decode(model):
        def run():
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=0)

        return run

    rows = []
    for name, make, mode in (("forward+backward", train_step, "train"), ("greedy decode", decode, "eval")):
        for model in (stock, slim):
            model.train(mode == "train")
            make(model)()  # warm-up
        times = {"stock": [], "slim": []}
        for _ in range(args.repeats):
            times["stock"].append(_time(make(stock), device))
            times["slim"].append(_time(make(slim), device))
        stock_t, slim_t = statistics.median(times["stock"]), statistics.median(times["slim"])
        rows.append((name, stock_t, slim_t, slim_t / stock_t))
        print(f"{name}: stock {stock_t * 1e3:.1f} ms, SlimMoe {slim_t * 1e3:.1f} ms, ratio {slim_t / stock_t:.3f}")

    hardware = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [
        "# SlimMoe vs stock Qwen3-MoE: speed",
        "",
        "Identical config and weights (SlimMoe built with `hf_slim.convert.from_hf`), timed in alternation in one run;",
        f"median of {args.repeats} repeats after a warm-up. Target: ratio SlimMoe / stock <= 1.05.",
        "",
        f"Command: `python benchmarks/bench_slim_moe.py --repeats {args.repeats} --device {device} "
        f"--new-tokens {args.new_tokens} --threads {args.threads}`",
        "",
        f"Config: 4 layers, hidden 512, 8 heads (2 KV), 64 experts top-8 of width 192, vocab 8192; "
        f"batch {args.batch} x {args.seq} tokens for forward+backward; decode {args.new_tokens} new tokens from a 32-token prompt.",
        f"Hardware: {hardware}; torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}; "
        f"experts implementation: {slim.config._experts_implementation}, attention: {slim.config._attn_implementation}.",
        "Their logits agree within 1e-5 (tested in `tests/test_convert.py`).",
        "",
        "| workload | stock Qwen3MoeForCausalLM | SlimMoeForCausalLM | ratio |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {r:.3f} |" for name, a, b, r in rows]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
