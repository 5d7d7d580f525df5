"""Peak memory and time of chunked KD (`hf_slim.losses.chunked_kd_loss`) against full-logit KD, side by side.

Every (method, repeat) runs forward + backward once in a fresh subprocess, so each peak is measured on its own:
the peak is the process's resident-set high-water mark (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which sees
every page torch's CPU allocator touches) minus the resident set just before the loss call (inputs, weights and
libraries already loaded). A sampling thread reading `/proc/self/statm` every millisecond cross-checks it. Methods are
interleaved and their order rotated in every repeat, so drift in machine load hits all of them alike; the table
reports medians and ratios to the naive full-logit loss.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_kd_memory.py            # writes docs/kd_memory.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_kd_memory.py --seq 256 --vocab 32000 --no-write  # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _docs import write_marked_block


METHODS = {
    "naive": "naive full-logit KD (F.log_softmax + F.kl_div on [N, V] logits)",
    "trl_gkd_full": "TRL `GKDTrainer.generalized_jsd_loss` (beta=0) on [N, V] logits",
    "trl_chunked": "TRL 1.16 `ChunkedDivergenceFunction` (DistillationTrainer's chunked divergence, torch path)",
    "chunked": "hf_slim `chunked_kd_loss` (gradient computed per chunk in forward)",
    "chunked_recompute": "hf_slim `chunked_kd_loss(recompute=True)` (projections redone in backward)",
}
MARK_START, MARK_END = "<!-- bench_kd_memory:start -->", "<!-- bench_kd_memory:end -->"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class _RssSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_bytes()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, _rss_bytes())


def _loss_fn(method: str, chunk_size: int, temperature: float):
    import torch
    import torch.nn.functional as F

    if method == "naive":

        def fn(hs, ws, ht, wt):
            log_ps = F.log_softmax(hs @ ws.t() / temperature, dim=-1)
            with torch.no_grad():
                log_pt = F.log_softmax(ht @ wt.t() / temperature, dim=-1)
            per_token = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
            return per_token.mean() * temperature**2

    elif method == "trl_gkd_full":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        def fn(hs, ws, ht, wt):
            s_logits = (hs @ ws.t()).unsqueeze(0)
            with torch.no_grad():
                t_logits = (ht @ wt.t()).unsqueeze(0)
            loss = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, beta=0.0, temperature=temperature)
            # TRL's batchmean divides by the batch size (1 here), not by tokens, and does not scale by T²
            return loss / hs.shape[0] * temperature**2

    elif method == "trl_chunked":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def fn(hs, ws, ht, wt):
            per_token, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, 0.0, temperature)
            return per_token.mean() * temperature**2

    elif method in ("chunked", "chunked_recompute"):
        from hf_slim.losses import chunked_kd_loss

        recompute = method == "chunked_recompute"

        def fn(hs, ws, ht, wt):
            return chunked_kd_loss(hs, ws, ht, wt, temperature=temperature, chunk_size=chunk_size, recompute=recompute)

    else:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}.")
    return fn


def _worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    fn = _loss_fn(args.worker, args.chunk_size, args.temperature)

    # Warm up thread pools and kernels on a tiny problem: nothing of the real size is allocated before the baseline.
    g = torch.Generator().manual_seed(1)
    small = [torch.randn(64, args.hidden, generator=g), torch.randn(512, args.hidden, generator=g)]
    small_t = [torch.randn(64, args.teacher_hidden, generator=g), torch.randn(512, args.teacher_hidden, generator=g)]
    small[0].requires_grad_()
    small[1].requires_grad_()
    fn(small[0], small[1], small_t[0], small_t[1]).backward()
    del small, small_t

    g = torch.Generator().manual_seed(0)
    # In-place scaling: a temporary [V, H] copy here would raise the high-water mark above the baseline.
    hs = torch.randn(args.seq, args.hidden, generator=g).requires_grad_()
    ws = torch.randn(args.vocab, args.hidden, generator=g).div_(args.hidden**0.5).requires_grad_()
    ht = torch.randn(args.seq, args.teacher_hidden, generator=g)
    wt = torch.randn(args.vocab, args.teacher_hidden, generator=g).div_(args.teacher_hidden**0.5)

    rss_before = _rss_bytes()
    maxrss_before = _maxrss_bytes()
    sampler = _RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    loss = fn(hs, ws, ht, wt)
    loss.backward()
    elapsed = time.perf_counter() - t0
    sampled_peak = sampler.stop()
    maxrss_after = _maxrss_bytes()
    result = {
        "method": args.worker,
        "time_s": elapsed,
        "peak_delta_bytes": maxrss_after - rss_before,
        "sampled_peak_delta_bytes": sampled_peak - rss_before,
        "setup_excess_bytes": maxrss_before - rss_before,  # > 0 would mean ru_maxrss hid part of the peak
        "loss": loss.item(),
        "grad_norms": [hs.grad.norm().item(), ws.grad.norm().item()],
    }
    print("RESULT " + json.dumps(result), flush=True)


def _run_one(method: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", method, "--vocab", str(args.vocab), "--seq", str(args.seq),
        "--hidden", str(args.hidden), "--teacher-hidden", str(args.teacher_hidden), "--chunk-size",
        str(args.chunk_size), "--temperature", str(args.temperature), "--threads", str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker {method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _environment() -> dict:
    import torch
    import transformers
    import trl

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / 2**20
    except OSError:
        mem_gib = float("nan")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _report(args: argparse.Namespace, results: dict[str, list[dict]], env: dict, command: str) -> str:
    base_mem = statistics.median(r["peak_delta_bytes"] for r in results["naive"])
    base_time = statistics.median(r["time_s"] for r in results["naive"])
    lines = [
        f"Command: `{command}`",
        "",
        f"Hardware: {env['cpu']}, {env['cores']} cores visible, {env['mem_gib']:.0f} GiB RAM, {args.threads} torch "
        f"threads, shared with other jobs. Versions: Python {env['python']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, TRL {env['trl']}.",
        "",
        f"Problem: vocab {args.vocab:,}, {args.seq} tokens (batch 1), student hidden {args.hidden}, teacher hidden "
        f"{args.teacher_hidden}, float32, forward KL, temperature {args.temperature}, chunk size {args.chunk_size}; "
        "forward + backward, gradients wrt the student hidden states and head weight. "
        f"{args.repeats} repeats, medians; every run in a fresh process.",
        "",
        "| method | peak extra memory (MiB) | vs naive | time (s) | vs naive | loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, runs in results.items():
        mem = statistics.median(r["peak_delta_bytes"] for r in runs)
        t = statistics.median(r["time_s"] for r in runs)
        lines.append(
            f"| {METHODS[method]} | {_mib(mem)} | {mem / base_mem:.2f}x | {t:.1f} | {t / base_time:.2f}x | "
            f"{runs[0]['loss']:.5f} |"
        )
    lines += ["", "Per repeat (peak MiB from ru_maxrss / from 1 ms RSS sampling, time s):", ""]
    lines.append("| method | " + " | ".join(f"repeat {i + 1}" for i in range(args.repeats)) + " |")
    lines.append("|---|" + "---|" * args.repeats)
    for method, runs in results.items():
        cells = [
            f"{_mib(r['peak_delta_bytes'])} / {_mib(r['sampled_peak_delta_bytes'])}, {r['time_s']:.1f}" for r in runs
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if "chunked" in results:
        mem = statistics.median(r["peak_delta_bytes"] for r in results["chunked"]) / base_mem
        t = statistics.median(r["time_s"] for r in results["chunked"]) / base_time
        verdict = "met" if mem <= 0.25 and t <= 1.1 else "NOT met"
        lines += [
            "",
            f"Targets (peak <= 0.25x naive at <= 1.1x its time) for `chunked`: memory {mem:.2f}x, time {t:.2f}x -> "
            f"**{verdict}**.",
        ]
    excess = max(r["setup_excess_bytes"] for runs in results.values() for r in runs)
    lines += [
        "",
        f"Check: the largest resident-set high-water mark left over from setup was {_mib(excess)} MiB above the "
        "resident set at the baseline (0 means ru_maxrss measured the loss's own peak).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024, help="student hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--methods", default="naive,trl_gkd_full,chunked", help=f"comma-separated, from {sorted(METHODS)}"
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "kd_memory.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "naive" not in methods:
        parser.error(f"--methods must include 'naive' and only names from {sorted(METHODS)}, got {args.methods!r}")
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_kd_memory.py " + " ".join(sys.argv[1:])
    results: dict[str, list[dict]] = {m: [] for m in methods}
    start = time.perf_counter()
    for repeat in range(args.repeats):
        order = methods[repeat % len(methods) :] + methods[: repeat % len(methods)]
        for method in order:
            r = _run_one(method, args)
            results[method].append(r)
            print(
                f"repeat {repeat + 1} {method:18s} peak {_mib(r['peak_delta_bytes']):>8s} MiB "
                f"(sampled {_mib(r['sampled_peak_delta_bytes'])}) time {r['time_s']:7.2f} s loss {r['loss']:.6f}",
                flush=True,
            )
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    block = _report(args, results, _environment(), command.strip())
    print(block)
    if not args.no_write:
        write_marked_block(args.output, MARK_START, MARK_END, block, "Memory-efficient KD")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
