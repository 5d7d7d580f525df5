"""Acceptance of self-speculative decoding on the demo's trained student: its MTP heads and its nested `small` variant.

Needs the demo's output (`make demo` writes `outputs/demo/slim_moe_elastic`). Greedy decoding from 32-token prefixes
of the demo's held-out documents; first checks that both speculative paths give plain greedy's tokens, then reports
tokens per verification step (1.0 = no speedup possible) and the per-depth acceptance of the MTP heads. It measures
acceptance only: at the demo's size (0.5M parameters) decode speed is bound by Python overhead, not weight reads.

    python benchmarks/bench_mtp_acceptance.py --folder outputs/demo/slim_moe_elastic
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="outputs/demo/slim_moe_elastic")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--prefix", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--draft-tokens", type=int, default=2, help="Tokens the nested variant drafts per step.")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from hf_slim.data import stdlib_corpus
    from hf_slim.demo import DemoConfig
    from hf_slim.models.slim_moe import SlimMoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = SlimMoeForCausalLM.from_pretrained(args.folder).eval()
    held_out = stdlib_corpus()[-DemoConfig().eval_documents :]
    small = model.config.elastic_variant_names()[0]
    mtp, depths, nested, equal = [], [], [], 0
    common = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    for doc in held_out[: args.prompts]:
        ids = tokenizer(doc, return_tensors="pt").input_ids[:, : args.prefix]
        plain = model.generate(ids, **common)
        with_mtp = model.generate(ids, use_mtp=True, **common)
        mtp.append(model.mtp_stats.tokens_per_step)
        depths.append(model.mtp_stats.depth_acceptance)
        draft = model.as_draft(small, num_assistant_tokens=args.draft_tokens)
        with_draft = model.generate(ids, assistant_model=draft, **common)
        nested.append(draft.stats.tokens_per_step)
        equal += int(torch.equal(with_mtp, plain)) + int(torch.equal(with_draft, plain))
    n = len(mtp)
    print(f"{n} prompts ({args.prefix}-token prefixes of the demo's held-out docs), {args.new_tokens} new tokens, greedy")
    print(f"speculative outputs equal to plain greedy: {equal} of {2 * n}")
    print(f"MTP heads ({model.config.num_mtp_heads} depths): tokens per verification step median "
          f"{statistics.median(mtp):.2f}, mean {statistics.mean(mtp):.2f}, range {min(mtp):.2f}-{max(mtp):.2f}")
    per_depth = [statistics.mean(d[k] for d in depths) for k in range(model.config.num_mtp_heads)]
    print("MTP acceptance per depth (mean over prompts):", [round(r, 3) for r in per_depth])
    print(f"nested variant {small!r} drafting {args.draft_tokens}: tokens per verification step median "
          f"{statistics.median(nested):.2f}, mean {statistics.mean(nested):.2f}, "
          f"range {min(nested):.2f}-{max(nested):.2f}")


if __name__ == "__main__":
    main()
