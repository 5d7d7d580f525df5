"""Elastic many-in-one checkpoints: storage, partial-load memory, decode speed per variant, budget generation.

One random-weight SlimMoe model is ordered with `make_elastic` (statistics from a short random calibration) and
saved once as a nested checkpoint; every variant is also sliced and saved standalone. Then, side by side in one run:

1. storage: nested checkpoint bytes / sum of the standalone checkpoints (full included); the floor is full / sum;
2. loading the smallest variant: peak RSS of `from_pretrained(nested, elastic_variant=...)` / peak RSS of
   `from_pretrained(standalone_small)`, both measured the same way: each in its own fresh subprocess, the resident
   set sampled from just before the load until the model is fully materialised (every parameter read, one
   forward), interleaved, median of `--repeats`; plus the bytes and reads of the partial load;
3. greedy decode tokens/s of each sliced variant relative to the full model, next to its active-parameter ratio
   (and the same variant run as prefix views of the full model, `elastic_variant=`);
4. budget-controlled generation (small variant thinks for `--think` tokens, full variant answers `--answer` tokens)
   against the full model writing all of it, with the share of time in each phase.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_elastic.py            # writes docs/elastic.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_elastic.py --hidden 256 --layers 4 --no-write  # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def _decode_rate(model, ids, new_tokens: int, **kwargs) -> float:
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        seconds = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / seconds


def run(args: argparse.Namespace) -> str:
    import torch
    import transformers

    import hf_slim  # noqa: F401
    from hf_slim.elastic import ElasticBudget, ElasticConfig, make_elastic
    from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM
    from hf_slim.pruning import collect_statistics
    from hf_slim.utils import count_parameters

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    h, e, i = args.hidden, args.experts, args.moe_intermediate
    config = SlimMoeConfig(
        vocab_size=args.vocab, hidden_size=h, num_hidden_layers=args.layers, num_attention_heads=8,
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
    calibration = torch.randint(0, args.vocab, (8, 64))
    stats = collect_statistics(full, calibration, num_samples=8, max_length=64, batch_size=4, show_progress=False)
    elastic = make_elastic(full, ElasticConfig(variants=variants), stats, layer_method="block_influence")
    del full
    names = ["small", "medium", "full"]
    models = {name: elastic.slice_variant(name).eval() if name != "full" else elastic for name in names}

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

    ids = torch.randint(0, args.vocab, (1, args.prompt))
    _decode_rate(models["small"], ids, 2)  # warm-up
    rates: dict[str, list[float]] = {f"{n}/{m}": [] for n in names for m in ("sliced", "views")}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            rates[f"{name}/sliced"].append(_decode_rate(models[name], ids, args.decode_tokens))
            if name != "full":
                rates[f"{name}/views"].append(_decode_rate(elastic, ids, args.decode_tokens, elastic_variant=name))
    active = {name: count_parameters(models[name])["active"] for name in names}

    budget = ElasticBudget("small", end_think_token_id=args.vocab - 1, max_thinking_tokens=args.think)
    budget_runs, full_runs = [], []
    for r in range(args.repeats):
        for kind in (("budget", "full") if r % 2 == 0 else ("full", "budget")):
            with torch.no_grad():
                if kind == "budget":
                    # the random model never emits the end token: the budget runs out and the token is forced
                    out = elastic.generate(ids, elastic_budget=budget, max_new_tokens=args.answer,
                                           min_new_tokens=args.answer, do_sample=False, pad_token_id=0,
                                           return_dict_in_generate=True)
                    budget_runs.append((out.thinking_seconds, out.answer_seconds, int(out.thinking_tokens[0]) + 1 + int(out.answer_tokens[0])))
                else:
                    total = args.think + 1 + args.answer
                    start = time.perf_counter()
                    elastic.generate(ids, max_new_tokens=total, min_new_tokens=total, do_sample=False, pad_token_id=0)
                    full_runs.append((time.perf_counter() - start, total))

    med = statistics.median
    lines = ["", "## Benchmark", ""]
    lines.append(
        f"`HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_elastic.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
    )
    lines += [
        "",
        f"Hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {args.threads} torch "
        f"thread(s), shared with other jobs. Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Random-weight SlimMoe, fp32: vocab {args.vocab}, hidden {h}, "
        f"{args.layers} layers, 8 heads / 4 KV heads, {e} experts (top-4) of width {i}, shared expert {i}, 1 MTP head. "
        f"Variants: `{json.dumps(variants)}`; medians of {args.repeats} interleaved repeats.",
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
        f"Greedy decoding of {args.decode_tokens} tokens after a {args.prompt}-token prompt, batch 1, KV cache. "
        "`sliced` is the standalone model (`slice_variant`), `views` the same variant computed on prefix views of "
        "the full model (`elastic_variant=`, an eager per-expert loop over strided views).",
        "",
        "| variant | active params | active / full | tokens/s sliced | speed / full | tokens/s views | views / full |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    full_rate = med(rates["full/sliced"])
    for name in names:
        sliced = med(rates[f"{name}/sliced"])
        views = med(rates[f"{name}/views"]) if rates[f"{name}/views"] else full_rate
        lines.append(
            f"| `{name}` | {active[name]:,} | {active[name] / active['full']:.3f} | {sliced:.1f} | {sliced / full_rate:.2f} "
            f"| {views:.1f} | {views / full_rate:.2f} |"
        )
    think_s = med([t for t, _, _ in budget_runs])
    answer_s = med([a for _, a, _ in budget_runs])
    tokens = budget_runs[0][2]
    full_s = med([t for t, _ in full_runs])
    lines += [
        "",
        "### Budget-controlled generation",
        "",
        f"`small` thinks for {args.think} tokens (budget exhausted, end token forced), then `full` is prefilled over "
        f"prompt + thinking and answers {args.answer} tokens; against `full` writing all {args.think + 1 + args.answer} "
        "tokens. The thinking phase runs on prefix views (`elastic_variant=\"small\"`) of the one loaded model.",
        "",
        "| run | seconds | tokens/s | thinking share | answer share |",
        "|---|---:|---:|---:|---:|",
        f"| budget (small thinks, full answers) | {think_s + answer_s:.2f} | {tokens / (think_s + answer_s):.1f} | "
        f"{think_s / (think_s + answer_s):.0%} | {answer_s / (think_s + answer_s):.0%} |",
        f"| full only | {full_s:.2f} | {(args.think + 1 + args.answer) / full_s:.1f} | | |",
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
    parser.add_argument("--repeats", type=int, default=3)
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
