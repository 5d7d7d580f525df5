"""SlimMoe vs stock Qwen3MoeForCausalLM of identical config: forward+backward and greedy decode, side by side.

The two models share every weight (SlimMoe is built with `hf_slim.convert.from_hf`). Before anything is timed the
outputs are checked, and the run aborts if they differ: forward logits within `--atol` (fp32), the greedy-decoded
tokens identical with per-step logits within `--atol`, and stock's cached decode equal to a loop of full forwards
without a cache (so a cache bug shared by both models cannot pass). Then both run the same inputs in alternated
order (stock, SlimMoe | SlimMoe, stock | ...) so machine noise hits both alike; the result is the median and min-max
of each, the ratio of medians SlimMoe / stock (target <= 1.05) and the min-max of the per-repeat ratios. Writes the
block between the markers in docs/benchmark_slim_moe.md.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_slim_moe.py --repeats 16 --threads 1 --device cpu
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch
import transformers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import alternate, cpu_model, load_average, machine_note, median, ratios, spread, timed  # noqa: E402
from _docs import write_marked_block  # noqa: E402

from hf_slim.convert import from_hf  # noqa: E402


MARK_START, MARK_END = "<!-- bench_slim_moe:start -->", "<!-- bench_slim_moe:end -->"
PROMPT = 32


def _config(hidden: int, layers: int, experts: int, width: int, vocab: int, heads: int = 8) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=2, head_dim=hidden // heads, num_experts=experts,
        num_experts_per_tok=8, moe_intermediate_size=width, norm_topk_prob=True, max_position_embeddings=2048,
    )


def _pair(config: Qwen3MoeConfig, device: str):
    stock = Qwen3MoeForCausalLM(config).to(device).float()
    with torch.no_grad():  # stock init leaves the norms at exactly one; randomise them so parity covers them
        for name, param in stock.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return stock, from_hf(stock).to(device)


def _bytes_read_per_token(model) -> int:
    """Weight bytes one decode step reads: everything but the embedding table, routed experts at top-k / experts."""
    config, total = model.config, 0
    for name, param in model.named_parameters():
        if "embed_tokens" in name or name.startswith("mtp."):
            continue
        share = config.num_experts_per_tok / config.num_experts if ".experts." in name else 1.0
        total += int(param.numel() * param.element_size() * share)
    return total


def _generate_kwargs(new_tokens: int) -> dict:
    # eos_token_id=None: every run writes exactly `new_tokens` tokens, so no logits processor differs between runs
    return dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)


def _reference_greedy(model, prompt: torch.Tensor, steps: int):
    """Greedy decoding by full forwards over the whole sequence, no cache: (sequences, [logits per step])."""
    ids, logits = prompt, []
    with torch.no_grad():
        for _ in range(steps):
            logits.append(model(ids, use_cache=False).logits[:, -1])
            ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], dim=-1)
    return ids, logits


def check_parity(stock, slim, ids: torch.Tensor, prompt: torch.Tensor, new_tokens: int, atol: float) -> dict:
    """Compare the two models' outputs; return the measured differences, raise SystemExit if any is out of bounds."""
    failures, found = [], {}
    stock.eval()
    slim.eval()
    with torch.no_grad():
        a, b = stock(ids, labels=ids), slim(ids, labels=ids)
        found["forward"] = float((a.logits - b.logits).abs().max())
        found["loss"] = abs(float(a.loss) - float(b.loss))
        if not found["forward"] <= atol:
            failures.append(f"forward logits differ by {found['forward']:.3g} (> {atol:g})")
        if not found["loss"] <= atol:
            failures.append(f"forward losses differ by {found['loss']:.3g} (> {atol:g})")
        kwargs = dict(**_generate_kwargs(new_tokens), return_dict_in_generate=True, output_logits=True)
        ra, rb = stock.generate(prompt, **kwargs), slim.generate(prompt, **kwargs)
    if ra.sequences.tolist() != rb.sequences.tolist():
        first = next(i for i, (x, y) in enumerate(zip(ra.sequences[0].tolist(), rb.sequences[0].tolist())) if x != y)
        failures.append(f"greedy decode differs from token {first - prompt.shape[1]} of {new_tokens} on")
    else:
        found["decode"] = max(float((x - y).abs().max()) for x, y in zip(ra.logits, rb.logits))
        if not found["decode"] <= atol:
            failures.append(f"greedy decode's per-step logits differ by {found['decode']:.3g} (> {atol:g})")
    # the reference is stock without a cache: if stock's cached decode matches it, the cache path of the reference
    # is right and SlimMoe matching stock means SlimMoe's is too
    sequences, logits = _reference_greedy(stock, prompt, new_tokens)
    if sequences.tolist() != ra.sequences.tolist():
        failures.append("stock's cached greedy decode differs from its no-cache reference loop")
    else:
        found["reference"] = max(float((x - y).abs().max()) for x, y in zip(ra.logits, logits))
        if not found["reference"] <= atol:
            failures.append(f"stock's cached decode logits differ from the no-cache loop by {found['reference']:.3g}")
    # how far a decode that ignores the cache (each step sees only its own token, the bug before 67e5512) would be
    with torch.no_grad():
        seq = ra.sequences
        blind = [
            stock(seq[:, p - 1 : p], position_ids=torch.tensor([[p - 1]], device=seq.device), use_cache=False).logits[:, -1]
            for p in range(prompt.shape[1] + 1, seq.shape[1])
        ]
    found["blind"] = max(float((x - y).abs().max()) for x, y in zip(ra.logits[1:], blind))
    found["blind_tokens"] = sum(int(x.argmax() != y.argmax()) for x, y in zip(ra.logits[1:], blind))
    found["tokens"] = ra.sequences[0, prompt.shape[1] :].tolist()
    if failures:
        raise SystemExit(
            "bench_slim_moe: SlimMoe and stock Qwen3-MoE do not give the same outputs, so their timings are not "
            "comparable; nothing was timed or written:\n  - " + "\n  - ".join(failures)
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode-hidden", type=int, default=1024, help="hidden size of the decode models")
    parser.add_argument("--atol", type=float, default=1e-5, help="largest logit difference the parity check accepts")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads; 1 by default because on a shared 2-core machine a second thread waits on the other "
        "core's load and inflates times tenfold",
    )
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent.parent / "docs" / "benchmark_slim_moe.md"))
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (the order alternates between repeats)")
    load_before = load_average()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # A Qwen3-30B-A3B-shaped layer stack scaled down to run on a laptop CPU: 48 -> 4 layers, hidden 2048 -> 512,
    # 128 experts (top-8) of width 768 -> 64 experts of width 192. Decoding (batch 1) does little work per step, so
    # it runs the same layout twice as wide (hidden 1024, experts of width 384): a step then reads ~230 MB of
    # weights, and the tiny model at the end shows the per-step overhead is a small part of it.
    train_config = _config(hidden=512, layers=4, experts=64, width=192, vocab=8192)
    decode_config = _config(hidden=args.decode_hidden, layers=4, experts=64, width=3 * args.decode_hidden // 8, vocab=8192)
    stock, slim = _pair(train_config, device)
    # no token 0: it is the pad id, and `generate` would mask it out of the prompt (the no-cache reference would not)
    ids = torch.randint(1, train_config.vocab_size, (args.batch, args.seq), device=device)
    prompt = ids[:1, :PROMPT]
    parity = {"train": check_parity(stock, slim, ids, prompt, args.new_tokens, args.atol)}
    dec_stock, dec_slim = _pair(decode_config, device)
    parity["decode"] = check_parity(dec_stock, dec_slim, ids, prompt, args.new_tokens, args.atol)
    for key, found in parity.items():
        print(f"parity ({key} config): forward logits {found['forward']:.2e}, decode logits {found['decode']:.2e}, "
              f"stock cached vs no-cache {found['reference']:.2e}, cache-blind decode would differ by "
              f"{found['blind']:.2e} ({found['blind_tokens']} argmax changes)")

    def train_step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()

        return run

    def decode(model, new_tokens):
        vocab = model.config.vocab_size
        # the checked prompt itself; only the tiny model below, with a smaller vocabulary, gets it folded (no 0)
        tokens = prompt if int(prompt.max()) < vocab else prompt % (vocab - 1) + 1

        def run():
            with torch.no_grad():
                model.generate(tokens, **_generate_kwargs(new_tokens))

        return run

    rows = []
    for model in (stock, slim):
        model.train()
        train_step(model)()  # warm-up
    times = alternate([("stock", timed(train_step(stock), sync)), ("slim", timed(train_step(slim), sync))], args.repeats)
    rows.append(("forward+backward", times))
    del stock, slim  # the decode pair is larger; free the training pair (and its gradients) first
    stock, slim = dec_stock, dec_slim
    for model in (stock, slim):
        model.eval()
        decode(model, args.new_tokens)()  # warm-up
    # the prefill-only runs (one new token) give the per-step decode time: (t(n) - t(1)) / (n - 1)
    times = alternate(
        [("stock", timed(decode(stock, args.new_tokens), sync)), ("slim", timed(decode(slim, args.new_tokens), sync)),
         ("stock/1", timed(decode(stock, 1), sync)), ("slim/1", timed(decode(slim, 1), sync))],
        args.repeats,
    )
    rows.append(("greedy decode", times))
    step = {k: (median(times[k]) - median(times[f"{k}/1"])) / (args.new_tokens - 1) for k in ("stock", "slim")}

    # Per-step overhead floor: the same layout at a size where compute is negligible.
    tiny_stock, tiny_slim = _pair(_config(hidden=64, layers=4, experts=64, width=16, vocab=512), device)
    tiny_stock.eval()
    tiny_slim.eval()
    for model in (tiny_stock, tiny_slim):
        decode(model, args.new_tokens)()
    tiny = alternate(
        [("stock", timed(decode(tiny_stock, args.new_tokens), sync)), ("slim", timed(decode(tiny_slim, args.new_tokens), sync)),
         ("stock/1", timed(decode(tiny_stock, 1), sync)), ("slim/1", timed(decode(tiny_slim, 1), sync))],
        args.repeats,
    )
    tiny_step = {k: (median(tiny[k]) - median(tiny[f"{k}/1"])) / (args.new_tokens - 1) for k in ("stock", "slim")}
    load_after = load_average()

    table = []
    for name, t in rows:
        per = ratios(t["slim"], t["stock"])
        a, b = median(t["stock"]), median(t["slim"])
        table.append(
            f"| {name} | {a * 1e3:.1f} ms ({spread([x * 1e3 for x in t['stock']])}) | "
            f"{b * 1e3:.1f} ms ({spread([x * 1e3 for x in t['slim']])}) | **{b / a:.3f}** | "
            f"{median(per):.3f} ({spread(per, '{:.3f}')}) |"
        )
        print(f"{name}: stock {a * 1e3:.1f} ms, SlimMoe {b * 1e3:.1f} ms, ratio {b / a:.3f} "
              f"(per repeat {spread(per, '{:.3f}')})")
    print(f"decode step: stock {step['stock'] * 1e3:.2f} ms, SlimMoe {step['slim'] * 1e3:.2f} ms; tiny model "
          f"{tiny_step['stock'] * 1e3:.2f} / {tiny_step['slim'] * 1e3:.2f} ms")

    if device.startswith("cuda"):
        hardware = f"{torch.cuda.get_device_name()}"
    else:
        hardware = f"{cpu_model()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s)"
    command = (
        f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_slim_moe.py --repeats {args.repeats} --device {device} "
        f"--batch {args.batch} --seq {args.seq} --new-tokens {args.new_tokens} --threads {args.threads}"
    )
    overhead = max(tiny_step.values()) / min(step.values())
    read_mb = _bytes_read_per_token(slim) / 1e6
    if overhead <= 0.34:
        verdict = ("so the decode figure is dominated by the size-dependent work (the matmuls over the weights read), "
                   "not by overhead.")
    else:
        verdict = ("a large share: the decode figure is NOT dominated by the size-dependent work; rerun with a larger "
                   "`--decode-hidden`.")

    def describe(config: Qwen3MoeConfig) -> str:
        return (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads "
                f"({config.num_key_value_heads} KV) of dim {config.head_dim}, {config.num_experts} experts top-"
                f"{config.num_experts_per_tok} of width {config.moe_intermediate_size}, vocab {config.vocab_size}")

    def parity_text(found: dict) -> str:
        return (
            f"forward logits on the {args.batch} x {args.seq} batch differ by at most {found['forward']:.1e}, losses by "
            f"{found['loss']:.1e}; the {args.new_tokens} greedy tokens are identical, their per-step logits within "
            f"{found['decode']:.1e}; stock's cached decode equals its loop of full forwards without a cache (same "
            f"tokens, logits within {found['reference']:.1e}); a decode ignoring the cache would have moved the step "
            f"logits by up to {found['blind']:.1e} and changed {found['blind_tokens']} of {args.new_tokens - 1} argmaxes"
        )

    lines = [
        "",
        f"Command: `{command}`",
        "",
        f"Models (fp32, random weights, norm weights drawn from U(0.5, 1.5)): forward+backward on "
        f"{describe(train_config)}, batch {args.batch} x {args.seq} tokens; greedy decode on {describe(decode_config)}, "
        f"{args.new_tokens} new tokens from a {PROMPT}-token prompt, batch 1, KV cache (`DynamicCache`), no EOS.",
        "",
        f"Hardware: {hardware}. Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; experts implementation: {slim.config._experts_implementation} (stock: "
        f"{stock.config._experts_implementation}), attention: {slim.config._attn_implementation} (stock: "
        f"{stock.config._attn_implementation}). {machine_note(args.threads, load_before, load_after)}",
        "",
        f"Parity, checked in this run on both pairs before anything is timed (the run aborts if a bound of "
        f"{args.atol:g} or a token fails): training models: {parity_text(parity['train'])}; decode models: "
        f"{parity_text(parity['decode'])}.",
        "",
        f"Timing: one warm-up each, then {args.repeats} repeats in alternated order (stock, SlimMoe | SlimMoe, stock "
        "| ...). Cells: median (min–max over the repeats). `ratio` is median SlimMoe / median stock; `per-repeat "
        "ratio` pairs the two runs of each repeat: median (min–max).",
        "",
        "| workload | stock Qwen3MoeForCausalLM | SlimMoeForCausalLM | ratio | per-repeat ratio |",
        "|---|---:|---:|---:|---:|",
        *table,
        "",
        f"Decode step, from prefill-only runs (one new token) timed in the same alternation, (t({args.new_tokens}) - "
        f"t(1)) / {args.new_tokens - 1}: stock {step['stock'] * 1e3:.1f} ms, SlimMoe {step['slim'] * 1e3:.1f} ms; a "
        f"step reads {read_mb:.0f} MB of weights (attention, router, the {decode_config.num_experts_per_tok} routed "
        f"experts, lm_head). The same layout at hidden 64 (expert width 16, vocab 512), where the matmuls are "
        f"negligible, takes {tiny_step['stock'] * 1e3:.1f} ms (stock) / {tiny_step['slim'] * 1e3:.1f} ms (SlimMoe) per "
        f"step: that is the per-step Python and framework overhead, at most {overhead:.0%} of a benchmarked step, "
        f"{verdict}",
        "",
    ]
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        write_marked_block(args.output, MARK_START, MARK_END, block, "SlimMoe vs stock Qwen3-MoE: speed")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
