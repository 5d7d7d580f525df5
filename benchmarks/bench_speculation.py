"""Self-speculative decoding with a nested variant: does drafting on prefix views or on a contiguous copy pay?

One random-weight SlimMoe model is ordered with `make_elastic`; its `small` variant drafts for the full model through
transformers' assisted generation (`model.generate(ids, assistant_model=model.as_draft("small"))`), once on prefix
views of the full weights and once on a contiguous copy (`as_draft("small", contiguous=True)`). Measured, in
alternated order (A B C, C B A, ...), median and min-max over `--repeats`:

1. greedy decode seconds per token of the full model, and of `small` on views and on the copy (plain `generate`);
2. assisted generation with each draft (`--draft-tokens` per step, confidence threshold 0 so every step drafts
   that many): whole-call seconds, the drafting share (`SpeculationStats.draft_seconds`), the seconds per verification
   step outside drafting;
3. from those, the tokens/s each draft would give at a per-token acceptance probability `a` (random weights agree
   rarely, so the measured acceptance says nothing about a trained checkpoint): tokens per step
   `(1 - a^(k+1)) / (1 - a)`, seconds per step `draft round + verification`.

Outputs are checked before timing (the run aborts otherwise): both assisted runs equal plain greedy decoding.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_speculation.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from _bench import alternate, load_average, machine_note, median, spread


def cell(values, fmt="{:.2f}") -> str:
    """Median (min–max)."""
    return f"{fmt.format(median(values))} ({spread(values, fmt)})"


def build(args):
    from hf_slim.elastic import ElasticConfig, make_elastic
    from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM
    from hf_slim.pruning import collect_statistics

    h = args.hidden
    config = SlimMoeConfig(
        vocab_size=args.vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=args.layers,
        num_attention_heads=h // 64, num_key_value_heads=h // 128, head_dim=64, num_experts=args.experts,
        num_experts_per_tok=4, moe_intermediate_size=args.moe_intermediate, shared_expert_intermediate_size=args.moe_intermediate,
        num_mtp_heads=0,
    )
    small = {
        "num_hidden_layers": args.layers // 2, "hidden_size": h // 2, "num_attention_heads": h // 128,
        "num_experts": args.experts // 2, "num_experts_per_tok": 2, "moe_intermediate_size": args.moe_intermediate // 2,
        "shared_expert_intermediate_size": args.moe_intermediate // 2,
    }
    torch.manual_seed(0)
    full = SlimMoeForCausalLM(config).eval()
    data = torch.randint(0, args.vocab, (4, 32), generator=torch.Generator().manual_seed(1))
    stats = collect_statistics(full, data, num_samples=4, max_length=32, batch_size=4, show_progress=False)
    return make_elastic(full, ElasticConfig(variants={"small": small}), stats, layer_method="block_influence").eval(), small


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    model, small = build(args)
    views = model.as_draft("small", num_assistant_tokens=args.draft_tokens, assistant_confidence_threshold=0.0)
    copy = model.as_draft("small", contiguous=True, num_assistant_tokens=args.draft_tokens,
                          assistant_confidence_threshold=0.0)
    ids = torch.randint(1, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(2))
    n = args.new_tokens
    greedy = {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n}

    plain = model.generate(ids, **greedy)
    for draft in (views, copy):  # checked before timing (and a warm-up)
        out = model.generate(ids, assistant_model=draft, **greedy)
        if not torch.equal(out, plain):
            raise SystemExit(f"assisted output with {draft!r} differs from plain greedy")

    stats = {}

    def assisted(name, draft):
        def run():
            start = time.perf_counter()
            model.generate(ids, assistant_model=draft, **greedy)
            seconds = time.perf_counter() - start
            stats.setdefault(name, []).append(draft.stats)
            return seconds

        return run

    def decode(fn):
        def run():
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) / n

        return run

    runs = [
        ("full", decode(lambda: model.generate(ids, **greedy))),
        ("small views", decode(lambda: model.generate(ids, elastic_variant="small", **greedy))),
        ("small copy", decode(lambda: copy._copy.generate(ids, **greedy))),
        ("assisted views", assisted("assisted views", views)),
        ("assisted copy", assisted("assisted copy", copy)),
    ]
    for _, fn in runs:
        fn()  # warm-up
    stats.clear()
    values = alternate(runs, args.repeats)
    load_after = load_average()

    k = args.draft_tokens
    print(machine_note(args.threads, load_before, load_after))
    print(f"\nhidden {args.hidden}, {args.layers} layers, {args.experts} experts (top-4) of width {args.moe_intermediate}, "
          f"vocab {args.vocab}; small = {small}; prompt {args.prompt}, {n} new tokens, k = {k}, batch 1, fp32, "
          f"{args.repeats} repeats\n")
    print("| decode | ms/token |\n|---|---:|")
    for name in ("full", "small views", "small copy"):
        print(f"| {name} | {cell([v * 1e3 for v in values[name]])} |")
    print("\n| assisted greedy | seconds | drafting s | draft ms / round | verify ms / step | steps | accepted / step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    per_round, per_verify = {}, {}
    for name in ("assisted views", "assisted copy"):
        runs_stats = stats[name]
        rounds = [sum(1 for d in s.drafted if d) for s in runs_stats]
        draft_ms = [s.draft_seconds / r * 1e3 for s, r in zip(runs_stats, rounds)]
        verify_ms = [(t - s.draft_seconds) / s.steps * 1e3 for t, s in zip(values[name], runs_stats)]
        per_round[name], per_verify[name] = median(draft_ms), median(verify_ms)
        print(f"| {name.split()[1]} | {cell(values[name], '{:.3f}')} | "
              f"{cell([s.draft_seconds for s in runs_stats], '{:.3f}')} | {cell(draft_ms)} | "
              f"{cell(verify_ms)} | {runs_stats[0].steps} | {runs_stats[0].accepted_per_step:.2f} |")
    full_tps = 1 / median(values["full"])
    print(f"\nprojected tokens/s (plain greedy full: {full_tps:.1f}) at per-token acceptance a:\n")
    print("| a | tokens / step | views | copy |\n|---:|---:|---:|---:|")
    verify = median([per_verify["assisted views"], per_verify["assisted copy"]])
    for a in (0.5, 0.7, 0.8, 0.9):
        tokens = (1 - a ** (k + 1)) / (1 - a)
        cells = [tokens / ((per_round[name] + verify) / 1e3) for name in ("assisted views", "assisted copy")]
        print(f"| {a} | {tokens:.2f} | {cells[0]:.1f} ({cells[0] / full_tps:.2f}x) | {cells[1]:.1f} ({cells[1] / full_tps:.2f}x) |")


if __name__ == "__main__":
    main()
