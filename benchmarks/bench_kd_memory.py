"""Peak memory and time of the chunked head losses of `hf_slim.losses` against full-logit losses, side by side.

Two problems (`--terms`):

- `all` (default, issue 13's measurement): SlimQwen's whole objective `(1 - λ)·LM + λ·KD + β·((1 - λ)·MTP-LM +
  λ·MTP-KD)` of the main head and `--mtp-depths` MTP depths, all sharing one `[V, H]` head: the fused
  `distillation_objective` against the same objective on full logits (`F.cross_entropy` + `F.kl_div` per depth) and
  against today's per-term functions (`lm_loss`, `mtp_lm_loss`, `mtp_kd_loss` weighed by `slimqwen_objective`).
- `kd`: the single KD term, `chunked_kd_loss` against full-logit KD, TRL's full-logit and chunked losses.

Every (method, repeat) runs forward + backward once in a fresh subprocess, so each peak is measured on its own:
the peak is the process's resident-set high-water mark (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which sees
every page torch's CPU allocator touches) minus the resident set just before the loss call (inputs, weights and
libraries already loaded). A sampling thread reading `/proc/self/statm` every millisecond cross-checks it. Methods are
interleaved and their order rotated in every repeat, so drift in machine load hits all of them alike; the table
reports medians, the min-max of the per-repeat ratios to the naive full-logit loss, and the process CPU time next to
the wall time (less sensitive to other jobs on a shared machine).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_kd_memory.py            # all terms, writes docs/kd_memory.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_kd_memory.py --terms kd  # the single KD term
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_kd_memory.py --seq 256 --vocab 32000 --no-write  # quick look

Before a run the driver refuses to start when the naive loss's expected peak (about `--naive-buffers` float32
`[tokens, vocab]` tensors) does not fit in the machine's available memory, instead of pushing a shared machine into
its out-of-memory killer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _bench import environment, load_average, machine_note
from _docs import write_marked_block


KD_METHODS = {
    "naive": "naive full-logit KD (F.log_softmax + F.kl_div on [N, V] logits)",
    "trl_gkd_full": "TRL `GKDTrainer.generalized_jsd_loss` (beta=0) on [N, V] logits",
    "trl_chunked": "TRL 1.16 `ChunkedDivergenceFunction` (DistillationTrainer's chunked divergence, torch path)",
    "chunked": "hf_slim `chunked_kd_loss` (gradient computed per chunk in forward)",
    "chunked_recompute": "hf_slim `chunked_kd_loss(recompute=True)` (projections redone in backward)",
}
ALL_METHODS = {
    "naive": "naive full-logit objective (per depth: F.cross_entropy and F.log_softmax + F.kl_div on [N, V] logits)",
    "naive_shared": "leaner full-logit objective (per depth: one F.log_softmax for F.nll_loss and F.kl_div)",
    "per_term": "hf_slim per-term functions (`lm_loss`, `mtp_lm_loss`, `mtp_kd_loss` + `slimqwen_objective`)",
    "per_term_recompute": "hf_slim per-term functions with `recompute=True`",
    "fused": "hf_slim `distillation_objective` (fused: one pass, one head-gradient buffer)",
    "fused_recompute": "hf_slim `distillation_objective(recompute=True)`",
}
METHODS = {"kd": KD_METHODS, "all": ALL_METHODS}
DEFAULT_METHODS = {"kd": "naive,trl_gkd_full,chunked", "all": "naive,per_term,fused"}
MARKS = {
    "kd": ("<!-- bench_kd_memory:start -->", "<!-- bench_kd_memory:end -->"),
    "all": ("<!-- bench_kd_memory_all:start -->", "<!-- bench_kd_memory_all:end -->"),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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


def _kd_loss_fn(method: str, chunk_size: int, temperature: float):
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
        raise ValueError(f"method must be one of {sorted(KD_METHODS)}, got {method!r}.")
    return fn


def _all_loss_fn(method: str, args: argparse.Namespace):
    """The whole objective of one sequence: `fn(hidden, mtp_hidden, head, teacher_hidden, teacher_head, labels)`."""
    import torch
    import torch.nn.functional as F

    lam, beta, t = args.lam, args.beta, args.temperature

    def weigh(lm, kd):
        total = (1 - lam) * lm[0] + lam * kd[0]
        if len(lm) > 1:
            total = total + beta * ((1 - lam) * torch.stack(lm[1:]).mean() + lam * torch.stack(kd[1:]).mean())
        return total

    if method == "naive":

        def fn(hs, mtp, ws, ht, wt, labels):
            seq = labels.shape[1]
            lm, kd = [], []
            for k, h in enumerate([hs, *mtp]):
                n = seq - 1 - k
                logits = h[0, :n] @ ws.t()
                lm.append(F.cross_entropy(logits, labels[0, 1 + k : 1 + k + n]))
                log_ps = F.log_softmax(logits if t == 1.0 else logits / t, dim=-1)
                del logits
                with torch.no_grad():
                    t_logits = ht[0, k : k + n] @ wt.t()
                    log_pt = F.log_softmax(t_logits if t == 1.0 else t_logits / t, dim=-1)
                    del t_logits
                per_token = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
                kd.append(per_token.mean() * t**2)
            return weigh(lm, kd)

    elif method == "naive_shared":
        # what a careful hand-written full-logit objective does at temperature 1: one log-softmax per depth for both
        # the cross-entropy and the KL (a sensitivity check of the ratios: fewer [N, V] tensors than `naive`)
        if t != 1.0:
            raise ValueError("naive_shared is written for --temperature 1 (the LM term uses the T = 1 softmax).")

        def fn(hs, mtp, ws, ht, wt, labels):
            seq = labels.shape[1]
            lm, kd = [], []
            for k, h in enumerate([hs, *mtp]):
                n = seq - 1 - k
                log_ps = F.log_softmax(h[0, :n] @ ws.t(), dim=-1)
                lm.append(F.nll_loss(log_ps, labels[0, 1 + k : 1 + k + n]))
                with torch.no_grad():
                    log_pt = F.log_softmax(ht[0, k : k + n] @ wt.t(), dim=-1)
                per_token = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
                kd.append(per_token.mean())
            return weigh(lm, kd)

    elif method in ("per_term", "per_term_recompute"):
        from hf_slim.losses import lm_loss, mtp_kd_loss, mtp_lm_loss

        recompute = method == "per_term_recompute"
        options = dict(chunk_size=args.chunk_size, recompute=recompute)

        def fn(hs, mtp, ws, ht, wt, labels):
            lm = [lm_loss(hs, ws, labels, **options)]
            kd = [mtp_kd_loss(hs, ws, ht, wt, 0, labels=labels, temperature=t, **options)]
            for k, h in enumerate(mtp, start=1):
                h = F.pad(h, (0, 0, 0, k))  # [1, T, H]: the last k rows are never read
                lm.append(mtp_lm_loss(h, ws, labels, k, **options))
                kd.append(mtp_kd_loss(h, ws, ht, wt, k, labels=labels, temperature=t, **options))
            return weigh(lm, kd)

    elif method in ("fused", "fused_recompute"):
        from hf_slim.losses import distillation_objective

        recompute = method == "fused_recompute"

        def fn(hs, mtp, ws, ht, wt, labels):
            loss, _ = distillation_objective(
                hs, ws, ht, wt, [labels] * (len(mtp) + 1), lam=lam, beta=beta, mtp_hidden=mtp, temperature=t,
                chunk_size=args.chunk_size, recompute=recompute,
            )  # fmt: skip
            return loss

    else:
        raise ValueError(f"method must be one of {sorted(ALL_METHODS)}, got {method!r}.")
    return fn


def _inputs(args: argparse.Namespace, seq: int, vocab: int, seed: int) -> tuple[list, list]:
    """(arguments of the loss function, the student tensors that receive a gradient)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    # In-place scaling: a temporary [V, H] copy here would raise the high-water mark above the baseline.
    hs = torch.randn(seq, args.hidden, generator=g).requires_grad_()
    ws = torch.randn(vocab, args.hidden, generator=g).div_(args.hidden**0.5).requires_grad_()
    ht = torch.randn(seq, args.teacher_hidden, generator=g)
    wt = torch.randn(vocab, args.teacher_hidden, generator=g).div_(args.teacher_hidden**0.5)
    if args.terms == "kd":
        return [hs, ws, ht, wt], [hs, ws]
    hs = hs.detach().view(1, seq, args.hidden).requires_grad_()
    mtp = [torch.randn(1, seq - k, args.hidden, generator=g).requires_grad_() for k in range(1, args.mtp_depths + 1)]
    labels = torch.randint(0, vocab, (1, seq), generator=g)
    return [hs, mtp, ws, ht.view(1, seq, args.teacher_hidden), wt, labels], [hs, ws, *mtp]


def _worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.terms == "kd":
        fn = _kd_loss_fn(args.worker, args.chunk_size, args.temperature)
    else:
        fn = _all_loss_fn(args.worker, args)

    # Warm up thread pools and kernels on a tiny problem: nothing of the real size is allocated before the baseline.
    small, small_params = _inputs(args, 64, 512, seed=1)
    fn(*small).backward()
    del small, small_params

    inputs, params = _inputs(args, args.seq, args.vocab, seed=0)
    rss_before = _rss_bytes()
    maxrss_before = _maxrss_bytes()
    sampler = _RssSampler()
    sampler.start()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    loss = fn(*inputs)
    loss.backward()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    sampled_peak = sampler.stop()
    maxrss_after = _maxrss_bytes()
    result = {
        "method": args.worker,
        "time_s": elapsed,
        "cpu_s": cpu,
        "peak_delta_bytes": maxrss_after - rss_before,
        "sampled_peak_delta_bytes": sampled_peak - rss_before,
        "setup_excess_bytes": maxrss_before - rss_before,  # > 0 would mean ru_maxrss hid part of the peak
        "loss": loss.item(),
        "grad_norms": [p.grad.norm().item() for p in params],
    }
    print("RESULT " + json.dumps(result), flush=True)


def _run_one(method: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", method, "--terms", args.terms, "--vocab", str(args.vocab), "--seq",
        str(args.seq), "--hidden", str(args.hidden), "--teacher-hidden", str(args.teacher_hidden), "--chunk-size",
        str(args.chunk_size), "--temperature", str(args.temperature), "--threads", str(args.threads),
        "--mtp-depths", str(args.mtp_depths), "--lam", str(args.lam), "--beta", str(args.beta),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker {method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _problem(args: argparse.Namespace) -> str:
    common = (
        f"vocab {args.vocab:,}, {args.seq} tokens (batch 1), student hidden {args.hidden}, teacher hidden "
        f"{args.teacher_hidden}, float32, forward KL, temperature {args.temperature}, chunk size {args.chunk_size}"
    )
    if args.terms == "kd":
        return f"Problem: the KD term alone; {common}; gradients wrt the student hidden states and head weight."
    return (
        f"Problem: all four terms (LM, KD, MTP-LM, MTP-KD) of the main head and {args.mtp_depths} MTP depths on one "
        f"shared head, λ = {args.lam}, β = {args.beta} (every term weighed), MTP-KD from the teacher's main head; "
        f"{common}; gradients wrt the student hidden states of every depth and the head weight."
    )


def _report(args: argparse.Namespace, results: dict[str, list[dict]], env: dict, command: str, note: str) -> str:
    names = METHODS[args.terms]
    naive = results["naive"]
    base_mem = statistics.median(r["peak_delta_bytes"] for r in naive)
    lines = [
        f"Command: `{command}`",
        "",
        f"Hardware: {env['cpu']}, {env['cores']} cores visible, {env['mem_gib']:.0f} GiB RAM, {args.threads} torch "
        f"threads. {note} Versions: Python {env['python']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, TRL {env['trl']}.",
        "",
        f"{_problem(args)} Forward + backward; {args.repeats} repeats, every run in a fresh process, the methods' "
        "order rotated each repeat. Time ratios are per repeat (runs of the same repeat are neighbours in time): "
        "median and min-max.",
        "",
        "| method | peak extra memory (MiB) | vs naive | wall time (s) | vs naive (min-max) | CPU time (s) | "
        "vs naive (min-max) | loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = {}
    for method, runs in results.items():
        mem = statistics.median(r["peak_delta_bytes"] for r in runs)
        wall = [r["time_s"] / b["time_s"] for r, b in zip(runs, naive)]
        cpu = [r["cpu_s"] / b["cpu_s"] for r, b in zip(runs, naive)]
        summary[method] = (mem / base_mem, statistics.median(wall), statistics.median(cpu))
        lines.append(
            f"| {names[method]} | {_mib(mem)} | {mem / base_mem:.3f}x | "
            f"{statistics.median(r['time_s'] for r in runs):.1f} | {statistics.median(wall):.2f}x "
            f"({min(wall):.2f}-{max(wall):.2f}) | {statistics.median(r['cpu_s'] for r in runs):.1f} | "
            f"{statistics.median(cpu):.2f}x ({min(cpu):.2f}-{max(cpu):.2f}) | {runs[0]['loss']:.5f} |"
        )
    lines += ["", "Per repeat (peak MiB from ru_maxrss / from 1 ms RSS sampling, wall s, CPU s):", ""]
    lines.append("| method | " + " | ".join(f"repeat {i + 1}" for i in range(args.repeats)) + " |")
    lines.append("|---|" + "---|" * args.repeats)
    for method, runs in results.items():
        cells = [
            f"{_mib(r['peak_delta_bytes'])} / {_mib(r['sampled_peak_delta_bytes'])}, {r['time_s']:.1f}, "
            f"{r['cpu_s']:.1f}"
            for r in runs
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    target_method, (mem_target, time_target) = ("chunked", (0.25, 1.1)) if args.terms == "kd" else ("fused", (0.10, 1.0))
    if target_method in summary:
        mem, wall, cpu = summary[target_method]
        verdict = "met" if mem <= mem_target and wall <= time_target else "NOT met"
        lines += [
            "",
            f"Targets (peak <= {mem_target:.2f}x naive at <= {time_target:.1f}x its time) for `{target_method}`: memory "
            f"{mem:.3f}x, wall time {wall:.2f}x (CPU time {cpu:.2f}x) -> **{verdict}**.",
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
    parser.add_argument("--terms", choices=sorted(METHODS), default="all", help="the whole objective or KD alone")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024, help="student hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=1024)
    parser.add_argument("--mtp-depths", type=int, default=2, help="MTP depths (--terms all)")
    parser.add_argument("--lam", type=float, default=0.875, help="λ, the KD weight (--terms all)")
    parser.add_argument("--beta", type=float, default=0.2, help="β, the MTP weight (--terms all)")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--methods", help=f"comma-separated; default {DEFAULT_METHODS}; names from {METHODS}")
    parser.add_argument(
        "--naive-buffers", type=float, default=None,
        help="float32 [tokens, vocab] tensors the naive loss is expected to peak at (default 6 for kd, 12 for all; "
        "measured: 4.5 and 11.5)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "kd_memory.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    methods = [m.strip() for m in (args.methods or DEFAULT_METHODS[args.terms]).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS[args.terms]]
    if unknown or "naive" not in methods:
        parser.error(
            f"--methods must include 'naive' and only names from {sorted(METHODS[args.terms])} for --terms "
            f"{args.terms}, got {args.methods!r}"
        )
    buffers = args.naive_buffers or (6 if args.terms == "kd" else 12)
    needed = buffers * args.seq * args.vocab * 4 + 3 * args.vocab * max(args.hidden, args.teacher_hidden) * 4
    available = _available_bytes()
    if available is not None and needed > 0.9 * available:
        parser.error(
            f"the naive loss is expected to need about {_mib(needed)} MiB but only {_mib(available)} MiB are available; "
            "lower --seq or --vocab, or run when the machine is free (--naive-buffers adjusts the estimate)"
        )
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_kd_memory.py " + " ".join(sys.argv[1:])
    results: dict[str, list[dict]] = {m: [] for m in methods}
    load_before = load_average()
    start = time.perf_counter()
    for repeat in range(args.repeats):
        order = methods[repeat % len(methods) :] + methods[: repeat % len(methods)]
        for method in order:
            r = _run_one(method, args)
            results[method].append(r)
            print(
                f"repeat {repeat + 1} {method:18s} peak {_mib(r['peak_delta_bytes']):>8s} MiB "
                f"(sampled {_mib(r['sampled_peak_delta_bytes'])}) time {r['time_s']:7.2f} s cpu {r['cpu_s']:7.2f} s "
                f"loss {r['loss']:.6f} grads {', '.join(f'{g:.5g}' for g in r['grad_norms'])}",
                flush=True,
            )
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    note = machine_note(args.threads, load_before, load_average())
    block = _report(args, results, environment(), command.strip(), note)
    print(block)
    if not args.no_write:
        start_mark, end_mark = MARKS[args.terms]
        write_marked_block(args.output, start_mark, end_mark, block, "Memory-efficient KD")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
