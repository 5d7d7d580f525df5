"""Bounded-memory pruning of a checkpoint with Qwen3-30B-A3B's real layer shapes, through `hf-slim prune`.

1. Writes a random-weight bf16 checkpoint in the Hub layout `save_pretrained` writes (per-expert tensors, one shard per
   decoder layer, an index): hidden 2048, 128 experts of width 768, top-8, 32 query / 4 KV heads of 128, vocab
   151,936 — with as many layers as it takes to reach `--min-gb` on disk. Nothing is held whole in memory: one layer
   at a time is generated and written.
2. Runs `hf-slim prune SRC OUT --hidden-size 0.75 --num-experts 0.5 --num-hidden-layers L-1 --calibration ...` in a
   child process (the CLI's own `main`), which reports its peak RSS (`VmHWM`) and its I/O (`/proc/self/io`) when
   it ends.
3. Times a plain layer-by-layer forward of the same calibration tokens (load a block, run it, free it; no hooks) and
   reports calibration time / that forward.

    python benchmarks/bench_prune_memory.py --min-gb 8 --work /tmp/bench_prune --docs docs/pruning_memory.md

The source checkpoint is reused between runs when its config matches (`--keep` keeps the pruned output too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import cpu_model  # noqa: E402

QWEN3_30B_A3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def _layer_tensors(config, i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One decoder layer of a Qwen3-MoE checkpoint, under the names `save_pretrained` writes."""
    h, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    e_w = config.moe_intermediate_size

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    p = f"model.layers.{i}."
    out = {
        p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p + "self_attn.q_proj.weight": rand(q, h),
        p + "self_attn.k_proj.weight": rand(kv, h),
        p + "self_attn.v_proj.weight": rand(kv, h),
        p + "self_attn.o_proj.weight": rand(h, q),
        p + "self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
        p + "self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
        p + "mlp.gate.weight": rand(config.num_experts, h),
    }
    for e in range(config.num_experts):
        out[p + f"mlp.experts.{e}.gate_proj.weight"] = rand(e_w, h)
        out[p + f"mlp.experts.{e}.up_proj.weight"] = rand(e_w, h)
        out[p + f"mlp.experts.{e}.down_proj.weight"] = rand(h, e_w)
    return out


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_checkpoint(folder: Path, min_gb: float, seed: int = 0) -> dict:
    """Write the random checkpoint (skipped when `folder` already holds one with the same config)."""
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    from hf_slim.data import stdlib_corpus, train_tokenizer

    probe = Qwen3MoeConfig(**QWEN3_30B_A3B, num_hidden_layers=1)
    gen = torch.Generator().manual_seed(seed)
    per_layer = _bytes(_layer_tensors(probe, 0, torch.Generator().manual_seed(0)))
    outer = 2 * probe.vocab_size * probe.hidden_size * 2 + probe.hidden_size * 2
    layers = max(2, math.ceil((min_gb * 1e9 - outer) / per_layer))
    config = Qwen3MoeConfig(**QWEN3_30B_A3B, num_hidden_layers=layers)
    marker = folder / "bench_source.json"
    wanted = {"config": config.to_diff_dict(), "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(wanted)):
        return json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    n_shards = layers + 1
    weight_map: dict[str, str] = {}
    total = 0

    def shard(k: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
        total += _bytes(tensors)

    outer_tensors = {
        "model.embed_tokens.weight": (torch.randn(config.vocab_size, config.hidden_size, generator=gen) * 0.02).to(
            torch.bfloat16
        ),
        "lm_head.weight": (torch.randn(config.vocab_size, config.hidden_size, generator=gen) * 0.02).to(
            torch.bfloat16
        ),
        "model.norm.weight": torch.ones(config.hidden_size, dtype=torch.bfloat16),
    }
    shard(1, outer_tensors)
    del outer_tensors
    for i in range(layers):
        shard(i + 2, _layer_tensors(config, i, gen))
        print(f"  wrote layer {i + 1}/{layers}", flush=True)
    metadata = {"total_size": total}
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    tokenizer = train_tokenizer(stdlib_corpus(max_documents=2000), vocab_size=4096)
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps(wanted) + "\n")
    return metadata


_CHILD = """
import json, sys, time
from hf_slim.cli import main
start = time.perf_counter()
rc = main(sys.argv[1:])
wall = time.perf_counter() - start
io = dict(line.split(': ') for line in open('/proc/self/io').read().split('\\n') if line)
# VmHWM: the peak RSS of this process image. ru_maxrss would also count the parent's RSS at the (v)fork.
hwm = next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM:'))
print('BENCH ' + json.dumps({'rc': rc, 'wall_s': wall, 'max_rss_bytes': hwm,
      'read_bytes': int(io['read_bytes']), 'write_bytes': int(io['write_bytes']), 'rchar': int(io['rchar']), 'wchar': int(io['wchar'])}))
"""


def run_cli(argv: list[str]) -> dict:
    """`hf-slim <argv>` in a fresh process; its own peak RSS and I/O counters."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode or not lines:
        raise SystemExit(f"hf-slim {' '.join(argv)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][6:])
    result["stdout"] = proc.stdout
    return result


def _calibration_ids(tokenizer, num_samples: int, max_length: int) -> torch.Tensor:
    from hf_slim.data import stdlib_corpus
    from hf_slim.pruning import pack_calibration_data

    return pack_calibration_data(
        stdlib_corpus(), tokenizer=tokenizer, num_samples=num_samples, max_length=max_length
    )


def time_calibration(source: Path, ids: torch.Tensor, batch_size: int, repeats: int) -> dict[str, list[float]]:
    """Layer-by-layer calibration vs the same layer-by-layer pass with no statistic hooks, alternated."""
    from _bench import alternate, timed

    from hf_slim.checkpoints import open_checkpoint
    from hf_slim.pruning import collect_statistics_layerwise
    from hf_slim.pruning import collector as collector_module

    def plain() -> None:
        # the same pass with the statistic hooks not installed: what a plain layer-by-layer forward costs
        install_block, install_final = collector_module._Collector.install_block, collector_module._Collector.install_final
        collector_module._Collector.install_block = lambda self, i: None
        collector_module._Collector.install_final = lambda self: None
        try:
            with open_checkpoint(source) as reader:
                collect_statistics_layerwise(reader, ids, ids.shape[0], ids.shape[1], batch_size, show_progress=False)
        finally:
            collector_module._Collector.install_block, collector_module._Collector.install_final = (
                install_block, install_final
            )

    def calibrate() -> None:
        with open_checkpoint(source) as reader:
            collect_statistics_layerwise(reader, ids, ids.shape[0], ids.shape[1], batch_size, show_progress=False)

    def cpu_timed(fn):
        # CPU seconds of this process (all threads): unlike wall time, other jobs on the machine do not inflate it
        def run() -> float:
            start = time.process_time()
            fn()
            return time.process_time() - start

        return run

    calibrate(), plain()  # warm-up, untimed: the first pass also pages the checkpoint in
    runs = [("calibration", timed(calibrate)), ("plain", timed(plain)),
            ("calibration cpu", cpu_timed(calibrate)), ("plain cpu", cpu_timed(plain))]  # fmt: skip
    return alternate(runs, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-gb", type=float, default=8.0, help="Smallest checkpoint size on disk, in GB.")
    parser.add_argument("--work", default="/tmp/bench_prune", help="Folder for the source and pruned checkpoints.")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="Alternated repeats of the calibration timing.")
    parser.add_argument("--skip-timing", action="store_true", help="Only the CLI run (peak memory, I/O).")
    parser.add_argument("--keep", action="store_true", help="Keep the pruned output.")
    parser.add_argument("--docs", default=None, help="Write the table into this docs page.")
    args = parser.parse_args()

    import statistics

    import transformers
    from transformers import AutoConfig, AutoTokenizer

    work = Path(args.work)
    source, output = work / "source", work / "pruned"
    start = time.perf_counter()
    meta = write_checkpoint(source, args.min_gb)
    ckpt_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    config = AutoConfig.from_pretrained(source)
    print(f"source: {config.num_hidden_layers} layers, {ckpt_bytes / 1e9:.2f} GB on disk "
          f"({time.perf_counter() - start:.0f} s to write or find)", flush=True)
    corpus = work / "calibration.txt"
    if not corpus.exists():
        from hf_slim.data import stdlib_corpus

        corpus.write_text("\n\n".join(stdlib_corpus()), encoding="utf-8")
    shutil.rmtree(output, ignore_errors=True)
    argv = [
        "prune", str(source), str(output), "--hidden-size", "0.75", "--num-experts", "0.5",
        "--num-hidden-layers", str(config.num_hidden_layers - 1), "--calibration", str(corpus),
        "--num-samples", str(args.num_samples), "--max-length", str(args.max_length),
        "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    cli = run_cli(argv)
    out_bytes = sum(p.stat().st_size for p in output.glob("*.safetensors"))
    pruned = AutoConfig.from_pretrained(output)
    print(cli["stdout"][-2000:])
    row = {
        "checkpoint_bytes": ckpt_bytes,
        "output_bytes": out_bytes,
        "peak_rss_bytes": cli["max_rss_bytes"],
        "peak_rss_over_checkpoint": cli["max_rss_bytes"] / ckpt_bytes,
        "wall_s": cli["wall_s"],
        "rchar": cli["rchar"],
        "wchar": cli["wchar"],
        "pruned": {k: getattr(pruned, k) for k in ("num_hidden_layers", "hidden_size", "num_experts")},
    }
    print(json.dumps(row, indent=2))
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)
    timing = None
    if not args.skip_timing:
        tokenizer = AutoTokenizer.from_pretrained(source)
        ids = _calibration_ids(tokenizer, args.num_samples, args.max_length)
        timing = time_calibration(source, ids, args.batch_size, args.repeats)
        for kind in ("", " cpu"):
            ratios = [a / b for a, b in zip(timing["calibration" + kind], timing["plain" + kind])]
            print(f"calibration / plain layer-by-layer forward{kind}: median {statistics.median(ratios):.3f} "
                  f"(runs {[round(r, 3) for r in ratios]}); calibration s {timing['calibration' + kind]}, "
                  f"plain s {timing['plain' + kind]}")
    if args.docs:
        from _docs import write_marked_block

        gb = 1e9
        lines = [
            f"Command: `python benchmarks/bench_prune_memory.py --min-gb {args.min_gb:g} --num-samples {args.num_samples} "
            f"--max-length {args.max_length} --batch-size {args.batch_size} --repeats {args.repeats}"
            f"{' --skip-timing' if args.skip_timing else ''} --docs {args.docs}`",
            "",
            f"Machine: {cpu_model()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU; "
            f"torch {torch.__version__}, transformers {transformers.__version__}.",
            "",
            "| | value |",
            "|---|---|",
            f"| source checkpoint (bf16, Qwen3-30B-A3B layer shapes) | {config.num_hidden_layers} layers, "
            f"{ckpt_bytes / gb:.2f} GB |",
            f"| pruned to | {row['pruned']['num_hidden_layers']} layers, hidden {row['pruned']['hidden_size']}, "
            f"{row['pruned']['num_experts']} experts: {out_bytes / gb:.2f} GB |",
            f"| calibration | {args.num_samples} x {args.max_length} tokens, batch {args.batch_size} |",
            f"| peak RSS of `hf-slim prune` | {row['peak_rss_bytes'] / gb:.2f} GB |",
            f"| peak RSS / checkpoint bytes | **{row['peak_rss_over_checkpoint']:.3f}** |",
            f"| wall time of `hf-slim prune` (calibration + pruning + writing) | {row['wall_s']:.0f} s |",
            f"| bytes read / written by the process (`/proc/self/io` rchar / wchar) | {row['rchar'] / gb:.2f} GB / "
            f"{row['wchar'] / gb:.2f} GB |",
        ]
        for kind, what in (("", "wall time"), (" cpu", "CPU time of the process")):
            if timing is None:
                break
            ratios = [a / b for a, b in zip(timing["calibration" + kind], timing["plain" + kind])]
            lines.append(
                f"| calibration / plain layer-by-layer forward, {what} (median of {len(ratios)} after a warm-up, "
                f"alternated) | **{statistics.median(ratios):.3f}** (range {min(ratios):.3f}–{max(ratios):.3f}; "
                f"{statistics.median(timing['calibration' + kind]):.1f} s vs "
                f"{statistics.median(timing['plain' + kind]):.1f} s) |"
            )
        write_marked_block(args.docs, f"<!-- bench_prune_memory {args.min_gb:g}GB -->",
                           f"<!-- /bench_prune_memory {args.min_gb:g}GB -->", "\n".join(lines),
                           "Bounded-memory pruning")  # fmt: skip


if __name__ == "__main__":
    main()
