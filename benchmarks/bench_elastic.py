"""Elastic many-in-one checkpoints: storage, partial-load memory, decode speed per variant, budget generation.

One random-weight SlimMoe model is ordered with `make_elastic` (statistics from a short random calibration) and
saved once as a nested checkpoint; every variant is also sliced and saved standalone. Then, side by side in one run:

1. storage: nested checkpoint bytes / sum of the standalone checkpoints (full included); the floor is full / sum;
2. loading the smallest variant: peak RSS of `from_pretrained(nested, elastic_variant=...)` / peak RSS of
   `from_pretrained(standalone_small)`, both measured the same way: each in its own fresh subprocess, the resident
   set sampled from just before the load until the model is fully materialised (every parameter read, one
   forward), interleaved, median of `--repeats`; plus the bytes and reads of the partial load;
3. greedy decode tokens/s of each sliced variant relative to the full model, next to its active-parameter ratio
   (and the same variant run as prefix views of the full model, `elastic_variant=`), with the same benchmark at
   hidden 64 as the per-token overhead floor;
4. budget-controlled generation (small variant thinks for `--think` tokens, full variant answers `--answer` tokens)
   against the full model writing all of it, with the share of time in each phase.

Before 3. and 4. are timed the outputs are checked and the run aborts on a mismatch: every variant's cached generate
on views equals its sliced model's, every sliced model's cached generate equals its own loop of full forwards
without a cache, and the budget run equals a reference composed of such loops (see `check_outputs`). Every timing
alternates its order between repeats (A B C, C B A, ...) and reports the median and min-max.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_elastic.py --threads 1   # writes docs/elastic.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_elastic.py --hidden 256 --layers 4 --no-write  # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import alternate, cpu_model, load_average, machine_note, median, ratios, spread
from _docs import write_marked_block


MARK_START, MARK_END = "<!-- bench_elastic:start -->", "<!-- bench_elastic:end -->"

_LOAD_SCRIPT = """
import json, os, resource, sys, threading, time
import torch
import hf_slim
from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM
from transformers import GenerationConfig
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
path, variant, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
ids = torch.randint(0, 64, (1, 8))
# warm-up outside the measurement, the same for both loads: config parsing, model classes built on the meta device
config = SlimMoeConfig.from_pretrained(path)
with torch.device("meta"):
    SlimMoeForCausalLM(config)
try:
    GenerationConfig.from_pretrained(path)
except OSError:
    pass
baseline, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
model = SlimMoeForCausalLM.from_pretrained(path, elastic_variant=None if variant == "-" else variant)
load_seconds = time.perf_counter() - start
after_load = rss() - baseline
# materialise: read every byte of every parameter (a memory-mapped weight is then resident), then one forward
with torch.no_grad():
    touched = sum(float(p.float().sum()) for p in model.parameters())
    model(ids)
peak[0] = max(peak[0], rss())
done.set()
thread.join()
report = getattr(model, "elastic_load_report", None) or {}
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "load_peak": peak[0] - baseline,
                  "after_load": after_load, "bytes_read": report.get("bytes_read"), "reads": report.get("reads"),
                  "load_seconds": load_seconds,
                  "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _load_peak(path: Path, variant: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(path), variant, str(threads)], capture_output=True, text=True, env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _generate_kwargs(new_tokens: int) -> dict:
    # eos_token_id=None: every run writes exactly `new_tokens` tokens (the random model has no EOS to respect)
    return dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)


def _decode_rate(model, ids, new_tokens: int, **kwargs) -> float:
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, **_generate_kwargs(new_tokens), **kwargs)
        seconds = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / seconds


def _reference_greedy(model, ids, steps: int, variant: str | None = None, stop: int | None = None):
    """Greedy decoding of one row by full forwards over the whole sequence, no cache: (written tokens, logits)."""
    import torch

    kwargs = {"elastic_variant": variant} if variant is not None else {}
    written, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            step = model(ids, use_cache=False, **kwargs).logits[:, -1]
            token = int(step[0].argmax())
            logits.append(step)
            written.append(token)
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=-1)
            if token == stop:
                break
    return written, logits


def _cached_greedy(model, ids, steps: int, **kwargs):
    import torch

    with torch.no_grad():
        out = model.generate(ids, **_generate_kwargs(steps), return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences[0, ids.shape[1] :].tolist(), list(out.logits)


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def check_outputs(elastic, models: dict, ids, args, budget) -> dict:
    """Outputs checked before timing; raises SystemExit naming every mismatch.

    - every variant's cached `generate` on prefix views (`elastic_variant=`) writes the same tokens as its sliced
      standalone model's cached `generate` (logits within `--atol`);
    - every sliced model's (and the full model's) cached `generate` equals its own loop of full forwards without a
      cache (a cache bug shared by both paths cannot pass);
    - budget generation equals the reference composed of no-cache loops: `think_variant` greedy until the end token
      or the budget, the end token forced, then the full model greedy for the answer; same counts;
    - the full-only run equals its no-cache loop.
    """
    failures, found = [], {"views": 0.0, "reference": 0.0}

    def compare(label, tokens, logits, ref_tokens, ref_logits, key):
        if tokens != ref_tokens:
            first = next((i for i, (x, y) in enumerate(zip(tokens, ref_tokens)) if x != y), min(len(tokens), len(ref_tokens)))
            failures.append(f"{label}: tokens differ from position {first} on ({tokens} vs {ref_tokens})")
            return
        diff = _max_diff(logits, ref_logits)
        found[key] = max(found[key], diff)
        if not diff <= args.atol:
            failures.append(f"{label}: same tokens but logits differ by {diff:.3g} (> {args.atol:g})")

    for name, model in models.items():
        tokens, logits = _cached_greedy(model, ids, args.decode_tokens)
        compare(f"`{name}` cached generate vs no-cache loop", tokens, logits,
                *_reference_greedy(model, ids, args.decode_tokens), "reference")
        if name != "full":
            compare(f"`{name}` on prefix views vs sliced", *_cached_greedy(elastic, ids, args.decode_tokens,
                    elastic_variant=name), tokens, logits, "views")
    total = args.think + 1 + args.answer
    compare("full-only run vs no-cache loop", *_cached_greedy(elastic, ids, total),
            *_reference_greedy(elastic, ids, total), "reference")

    import torch

    with torch.no_grad():
        out = elastic.generate(ids, elastic_budget=budget, **_generate_kwargs(args.answer), return_dict_in_generate=True)
    thinking, _ = _reference_greedy(elastic, ids, budget.max_thinking_tokens, variant=budget.think_variant,
                                    stop=budget.end_think_token_id)
    forced = not thinking or thinking[-1] != budget.end_think_token_id
    context = torch.cat([ids, ids.new_tensor([thinking + ([budget.end_think_token_id] if forced else [])])], dim=-1)
    answer, _ = _reference_greedy(elastic, context, args.answer)
    expected = context[0].tolist() + answer
    if out.sequences[0].tolist() != expected:
        failures.append(f"budget generation differs from the no-cache reference ({out.sequences[0].tolist()} vs {expected})")
    if (int(out.thinking_tokens[0]), bool(out.forced_end[0]), int(out.answer_tokens[0])) != (len(thinking), forced, len(answer)):
        failures.append("budget generation's counts differ from the reference's")
    found["budget"] = dict(thinking=len(thinking), forced=forced, answer=len(answer))
    if failures:
        raise SystemExit(
            "bench_elastic: outputs differ, so the timings would not be comparable; nothing was timed or written:\n  - "
            + "\n  - ".join(failures)
        )
    return found


def _build(args: argparse.Namespace, h: int, e: int, i: int, vocab: int):
    """Random SlimMoe of this size, ordered by `make_elastic`; returns (elastic model, {name: model}, variants)."""
    import torch

    from hf_slim.elastic import ElasticConfig, make_elastic
    from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM
    from hf_slim.pruning import collect_statistics

    config = SlimMoeConfig(
        vocab_size=vocab, hidden_size=h, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=h // 8, num_experts=e, num_experts_per_tok=4, moe_intermediate_size=i,
        shared_expert_intermediate_size=i, num_mtp_heads=1, intermediate_size=4 * h,
    )
    variants = {
        "small": {"num_hidden_layers": max(1, args.layers * 3 // 4), "hidden_size": h // 2, "num_attention_heads": 4,
                  "num_experts": e // 2, "num_experts_per_tok": 2, "moe_intermediate_size": i // 2,
                  "shared_expert_intermediate_size": i // 2},
        "medium": {"hidden_size": 3 * h // 4, "num_attention_heads": 8, "num_experts": 3 * e // 4,
                   "moe_intermediate_size": 3 * i // 4},
    }
    full = SlimMoeForCausalLM(config).eval()
    calibration = torch.randint(0, vocab, (8, 64))
    stats = collect_statistics(full, calibration, num_samples=8, max_length=64, batch_size=4, show_progress=False)
    elastic = make_elastic(full, ElasticConfig(variants=variants), stats, layer_method="block_influence").eval()
    models = {name: elastic.slice_variant(name).eval() for name in ("small", "medium")}
    models["full"] = elastic
    return elastic, models, variants


def _decode_runs(elastic, models, ids, new_tokens):
    """(key, fn -> tokens/s) for every variant, sliced and on prefix views."""
    runs = []
    for name, model in models.items():
        runs.append((f"{name}/sliced", lambda m=model: _decode_rate(m, ids, new_tokens)))
        if name != "full":
            runs.append((f"{name}/views", lambda n=name: _decode_rate(elastic, ids, new_tokens, elastic_variant=n)))
    return runs


def run(args: argparse.Namespace) -> str:
    import torch
    import transformers

    import hf_slim  # noqa: F401
    from hf_slim.elastic import ElasticBudget
    from hf_slim.utils import count_parameters

    load_before = load_average()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    h, e, i = args.hidden, args.experts, args.moe_intermediate
    elastic, models, variants = _build(args, h, e, i, args.vocab)
    names = ["small", "medium", "full"]

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        elastic.save_pretrained(tmp / "nested")
        for name in names:
            target = tmp / name
            if name == "full":
                plain = elastic.slice_variant("full")
                plain.config.elastic = None
                plain.save_pretrained(target)
            else:
                models[name].save_pretrained(target)
        nested_bytes = _folder_bytes(tmp / "nested")
        standalone = {name: _folder_bytes(tmp / name) for name in names}
        storage = {
            "nested": nested_bytes, "sum": sum(standalone.values()), **standalone,
        }
        peaks: dict[str, list] = {"nested": [], "standalone": []}
        for r in range(args.repeats):
            order = [("nested", tmp / "nested", "small"), ("standalone", tmp / "small", "-")]
            for kind, path, variant in order if r % 2 == 0 else order[::-1]:
                result = _load_peak(path, variant, args.threads)
                peaks[kind].append(result)
        bytes_read = peaks["nested"][0]["bytes_read"]

    # no token 0 (the pad id: `generate` would mask it out of the prompt) and no end-of-thinking token (vocab - 1)
    ids = torch.randint(1, args.vocab - 1, (1, args.prompt))
    # the random model is not expected to write the end token, so the budget runs out and the token is forced; the
    # check below compares with a reference either way and the table says which happened
    budget = ElasticBudget("small", end_think_token_id=args.vocab - 1, max_thinking_tokens=args.think)
    checked = check_outputs(elastic, models, ids, args, budget)
    print(f"outputs checked: views vs sliced logits within {checked['views']:.1e}, cached vs no-cache within "
          f"{checked['reference']:.1e}, budget run = reference {checked['budget']}", flush=True)

    _decode_rate(models["small"], ids, 2)  # warm-up
    _decode_rate(elastic, ids, 2, elastic_variant="small")
    rates = alternate(_decode_runs(elastic, models, ids, args.decode_tokens), args.repeats)
    active = {name: count_parameters(models[name])["active"] for name in names}

    # Per-token overhead floor: the same benchmark at hidden 64 (experts of width 16, vocab 512), where the matmuls
    # are negligible; timed the same way right after.
    tiny_elastic, tiny_models, _ = _build(args, 64, e, 16, 512)
    tiny_ids = ids % 510 + 1
    _decode_rate(tiny_models["small"], tiny_ids, 2)
    _decode_rate(tiny_elastic, tiny_ids, 2, elastic_variant="small")
    tiny_rates = alternate(_decode_runs(tiny_elastic, tiny_models, tiny_ids, args.decode_tokens), args.repeats)
    del tiny_elastic, tiny_models

    total = args.think + 1 + args.answer
    phases: list[tuple[float, float]] = []

    def budget_run() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            out = elastic.generate(ids, elastic_budget=budget, **_generate_kwargs(args.answer),
                                   return_dict_in_generate=True)
            seconds = time.perf_counter() - start
        phases.append((out.thinking_seconds, out.answer_seconds))
        return seconds

    def full_run() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            elastic.generate(ids, **_generate_kwargs(total))
            return time.perf_counter() - start

    budget_run()  # warm-up
    full_run()
    phases.clear()
    seconds = alternate([("budget", budget_run), ("full", full_run)], args.repeats)
    load_after = load_average()

    med = median
    lines = ["", "## Benchmark", ""]
    lines.append(
        f"`HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_elastic.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
    )
    lines += [
        "",
        f"Hardware: {cpu_model()}, {os.cpu_count()} CPU cores, {args.threads} torch thread(s). "
        f"{machine_note(args.threads, load_before, load_after)} Python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}. Random-weight SlimMoe, fp32: vocab {args.vocab}, "
        f"hidden {h}, {args.layers} layers, 8 heads / 4 KV heads, {e} experts (top-4) of width {i}, shared expert {i}, "
        f"1 MTP head. Variants: `{json.dumps(variants)}`. Every timing is {args.repeats} repeats in alternated order "
        "(A B C, C B A, ...) after a warm-up; cells give the median and (min–max) over the repeats.",
        "",
        "### Storage",
        "",
        "| checkpoint | bytes | share of the sum of standalone |",
        "|---|---:|---:|",
    ]
    for name in names:
        lines.append(f"| standalone `{name}` | {storage[name]:,} | {storage[name] / storage['sum']:.3f} |")
    lines.append(f"| sum of standalone | {storage['sum']:,} | 1.000 |")
    lines.append(f"| **nested (one checkpoint)** | {storage['nested']:,} | **{storage['nested'] / storage['sum']:.3f}** |")
    lines += [
        "",
        f"The floor is full / sum = {storage['full'] / storage['sum']:.3f}: the nested checkpoint is the full model "
        "(plus its `elastic` entry in config.json).",
        "",
        "### Loading the smallest variant",
        "",
        "Each load runs in a fresh subprocess and is measured the same way. Before the measurement both parse the "
        "config and build the model class on the meta device (imports, not weights). `peak` is the highest "
        "resident set sampled every 0.5 ms (`/proc/self/statm`) from just before `from_pretrained` until the model "
        "is fully materialised (every parameter read once, then one forward, so weights a load leaves "
        "memory-mapped are resident too), minus the resident set just before the load; it includes what the "
        "load and the first forward import or cache on first use, the same for both. `after load` is the resident "
        "set right after `from_pretrained` returns (before the weights are touched), `params` the parameter bytes. "
        "`ru_maxrss` is the process high-water mark, dominated here by importing torch and transformers.",
        "",
        "| load | peak (MiB) | after load (MiB) | params (MiB) | ru_maxrss (MiB) | bytes read | reads | load s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def summary(kind: str) -> dict:
        runs = peaks[kind]
        return {
            "load": med([p["load_peak"] for p in runs]) / 2**20,
            "after": med([p["after_load"] for p in runs]) / 2**20,
            "params": runs[0]["param_bytes"] / 2**20,
            "maxrss": med([p["peak_kib"] for p in runs]) / 1024,
            "seconds": med([p["load_seconds"] for p in runs]),
        }

    nested, alone = summary("nested"), summary("standalone")
    reads = peaks["nested"][0]["reads"]
    lines.append(
        f"| `from_pretrained(nested, elastic_variant=\"small\")` | {nested['load']:.1f} | {nested['after']:.1f} | "
        f"{nested['params']:.1f} | {nested['maxrss']:.1f} | {bytes_read:,} of {storage['nested']:,} | {reads:,} | "
        f"{nested['seconds']:.2f} |"
    )
    lines.append(
        f"| `from_pretrained(standalone_small)` | {alone['load']:.1f} | {alone['after']:.1f} | {alone['params']:.1f} | "
        f"{alone['maxrss']:.1f} | {storage['small']:,} (whole file, mapped) | | {alone['seconds']:.2f} |"
    )
    lines.append(
        f"| **ratio nested / standalone** | **{nested['load'] / max(alone['load'], 1e-9):.3f}** | "
        f"{nested['after'] / max(alone['after'], 1e-9):.3f} | | {nested['maxrss'] / alone['maxrss']:.3f} | | | |"
    )
    lines += [
        "",
        "### Decode speed per variant",
        "",
        f"Greedy decoding of {args.decode_tokens} tokens after a {args.prompt}-token prompt, batch 1, KV cache; "
        "tokens/s is new tokens over the whole `generate` call (prefill included). `sliced` is the standalone model "
        "(`slice_variant`), `views` the same variant computed on prefix views of the full model (`elastic_variant=`, "
        "an eager per-expert loop over strided views). `/ full` is the ratio of medians, `per repeat` the median "
        "(min–max) of the ratios within each repeat.",
        "",
        f"Outputs checked before timing (the run aborts otherwise): each variant's cached `generate` on views writes "
        f"the same {args.decode_tokens} tokens as its sliced model's (logits within {checked['views']:.1e}), and each "
        f"sliced model's cached `generate` (the full model's too) the same tokens as its own loop of full forwards "
        f"without a cache (logits within {checked['reference']:.1e}); bound {args.atol:g}.",
        "",
        "| variant | active params | active / full | tokens/s sliced | sliced / full (per repeat) | tokens/s views "
        "| views / full (per repeat) | tiny: ms/token sliced, views |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(values: list[float]) -> str:
        return f"{med(values):.1f} ({spread(values)})"

    def ratio_cell(key: str) -> str:
        per = ratios(rates[key], rates["full/sliced"])
        return f"{med(rates[key]) / med(rates['full/sliced']):.2f} ({spread(per, '{:.2f}')})"

    def ms(values: list[float]) -> str:
        return f"{1e3 / med(values):.1f}"

    for name in names:
        views_key = f"{name}/views" if name != "full" else "full/sliced"
        lines.append(
            f"| `{name}` | {active[name]:,} | {active[name] / active['full']:.3f} | {cell(rates[f'{name}/sliced'])} | "
            f"{ratio_cell(f'{name}/sliced')} | {cell(rates[views_key])} | {ratio_cell(views_key)} | "
            f"{ms(tiny_rates[f'{name}/sliced'])}, {ms(tiny_rates[views_key])} |"
        )
    overhead = {key: (1e3 / med(tiny_rates[key])) / (1e3 / med(rates[key])) for key in rates}
    worst = max(overhead, key=overhead.get)
    lines += [
        "",
        f"The last column is the same benchmark at hidden 64 (experts of width 16, vocab 512), where the matmuls are "
        f"negligible: per-token Python and framework overhead. It is {overhead['full/sliced']:.0%} of a `full` token, "
        f"{overhead['small/sliced']:.0%} of a sliced `small` token and {overhead['small/views']:.0%} of a `small` token "
        f"on views (largest: `{worst}`, {overhead[worst]:.0%}). "
        + (
            "At this size the decode figures are dominated by per-token overhead, not by the variants' sizes: the "
            "speed ratios understate what the active-parameter ratios would give at a size bound by weight reads."
            if overhead[worst] > 0.5
            else "At this size overhead is a large share of the smaller variants' tokens: their speed-up understates "
            "the active-parameter ratio."
            if overhead[worst] > 0.25
            else "At this size the decode figures are set mostly by the variants' sizes, not by overhead."
        ),
        "`full` has no views path (it is the loaded model); its row repeats the sliced figure.",
    ]
    think_s = [t for t, _ in phases]
    answer_s = [a for _, a in phases]
    think_share = [t / (t + a) for t, a in phases]
    per = ratios(seconds["budget"], seconds["full"])
    budget_tokens = checked["budget"]["thinking"] + int(checked["budget"]["forced"]) + checked["budget"]["answer"]
    lines += [
        "",
        "### Budget-controlled generation",
        "",
        f"`small` thinks for {checked['budget']['thinking']} tokens ("
        + ("budget exhausted, end token forced" if checked["budget"]["forced"] else "it wrote the end token itself")
        + "), then `full` is prefilled over "
        f"prompt + thinking and answers {args.answer} tokens; against `full` writing all {total} tokens (batch 1, "
        "greedy, KV cache). The thinking phase runs on prefix views (`elastic_variant=\"small\"`) of the one loaded "
        "model. Seconds are the whole `generate` call.",
        "",
        f"Output checked before timing: the budget run's sequence equals a reference of full forwards without a cache "
        f"(`small` on views for {checked['budget']['thinking']} thinking steps, end token "
        f"{'forced' if checked['budget']['forced'] else 'emitted'}, then `full` for {checked['budget']['answer']} answer "
        f"steps), with the same token counts; the full-only run's {total} tokens equal its no-cache loop.",
        "",
        "| run | seconds | tokens/s | budget / full-only (per repeat) | thinking share | answer share |",
        "|---|---:|---:|---:|---:|---:|",
        f"| budget (small thinks, full answers) | {med(seconds['budget']):.3f} ({spread(seconds['budget'], '{:.3f}')}) | "
        f"{budget_tokens / med(seconds['budget']):.1f} | {med(seconds['budget']) / med(seconds['full']):.2f} "
        f"({spread(per, '{:.2f}')}) | {med(think_share):.0%} ({spread([x * 100 for x in think_share], '{:.0f}')}%) | "
        f"{1 - med(think_share):.0%} |",
        f"| full only | {med(seconds['full']):.3f} ({spread(seconds['full'], '{:.3f}')}) | "
        f"{total / med(seconds['full']):.1f} | 1.00 | | |",
        "",
        f"Phase medians of the budget run: thinking {med(think_s):.3f} s ({spread(think_s, '{:.3f}')}), answer "
        f"{med(answer_s):.3f} s ({spread(answer_s, '{:.3f}')}); tokens/s counts the tokens after the prompt "
        f"({budget_tokens} and {total}, a forced end token included).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--think", type=int, default=96)
    parser.add_argument("--answer", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--atol", type=float, default=1e-5, help="largest logit difference the output checks accept")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoints go")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "elastic.md")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args()
    block = run(args)
    print(block)
    if not args.no_write:
        write_marked_block(args.output, MARK_START, MARK_END, block, "Elastic checkpoints")


if __name__ == "__main__":
    main()
