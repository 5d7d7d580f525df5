"""Aurora on FSDP2-sharded parameters: bytes and step time of the owner path vs DTensor's implicit redistribution.

Spawns 2 CPU processes (gloo). Each process holds the FSDP2 (`fully_shard`) shards of one scaled Qwen3-30B-A3B
decoder layer (the matrices of benchmarks/bench_aurora.py §1) and times three ways to take one Aurora step:

- unsharded: `Aurora` on full local copies (what one process alone would do; the baseline),
- implicit: the per-parameter update applied to the DTensors themselves, redistributed by DTensor wherever an
  op needs it (what `Aurora` did before it handled DTensors on purpose),
- owner: `Aurora` on the DTensors (each matrix computed whole by one owner rank, hf_slim/optim/sharded.py).

Writes docs/aurora_bench_sharded.md.

    HF_HUB_OFFLINE=1 python benchmarks/bench_aurora_sharded.py
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_slim.optim import Aurora, aurora_update  # noqa: E402
from hf_slim.optim.polar import resolve_ns_dtype  # noqa: E402
from hf_slim.optim.sharded import CollectiveCounter  # noqa: E402


sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_aurora import qwen3_30b_a3b_layer_shapes  # noqa: E402


class Layer(nn.Module):
    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.names = list(shapes)
        for i, shape in enumerate(shapes.values()):
            self.register_parameter(f"w{i}", nn.Parameter(torch.randn(shape, generator=g) * 0.02))


class ImplicitAurora(Aurora):
    """The per-parameter Aurora update written against DTensors, letting DTensor redistribute (the pre-issue-13 path)."""

    def _aurora_group(self, group):
        opts = {k: group[k] for k in ("ns_schedule", "ns_steps", "pp_iterations", "pp_beta", "ns_dtype", "eps")}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            update, C = aurora_update(
                p.grad, state["momentum_buffer"], momentum=group["momentum"], nesterov=group["nesterov"],
                row_scale=state.get("row_scale"), scale=group["scale"], **opts,
            )  # fmt: skip
            if group["carry_row_scale"] and C is not None:
                state["row_scale"] = C
            p.add_(update.to(p.dtype), alpha=-group["lr"])


def _grads(shapes, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * torch.exp(torch.randn(*s[:-1], 1, generator=g)) for s in shapes.values()]


def _sharded(shapes, placement_fn):
    from torch.distributed.fsdp import fully_shard

    layer = Layer(shapes)
    fully_shard(layer, shard_placement_fn=placement_fn)
    return layer


def _set_grads(params, full_grads) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    for p, g in zip(params, full_grads):
        p.grad = distribute_tensor(g.clone(), p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor) else g.clone()


def _time(opt, reps: int) -> tuple[float, float]:
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        opt.step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def worker(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.tensor import Shard

    shapes = qwen3_30b_a3b_layer_shapes()
    full_grads = _grads(shapes)
    layouts = {
        "FSDP2 default: Shard(0) everywhere (experts split by expert)": None,
        "experts sharded on a matrix dim: Shard(1) for the 3D tensors": lambda p: Shard(1) if p.ndim == 3 else None,
    }
    out = {}
    for ns_dtype in args.dtypes.split(","):
        for layout_name, placement_fn in layouts.items():
            kw = {"lr": 0.02, "ns_dtype": ns_dtype}
            unsharded = Layer(shapes)
            opts = {"unsharded": Aurora(list(unsharded.parameters()), **kw)}
            _set_grads(list(unsharded.parameters()), full_grads)
            models = {"unsharded": unsharded}
            for name, cls in (("implicit", ImplicitAurora), ("owner", Aurora)):
                model = _sharded(shapes, placement_fn)
                opts[name] = cls(list(model.parameters()), **kw)
                _set_grads(list(model.parameters()), full_grads)
                models[name] = model
            # One counted step each (bytes, collectives), from the same state, and the update's agreement.
            row = {}
            starts = {n: [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in m.parameters()] for n, m in models.items()}
            for name, opt in opts.items():
                counter = CollectiveCounter(world)
                stats0 = dict(opt.comm_stats)
                with counter:
                    opt.step()
                row[name] = {"bytes": counter.bytes_sent, "collectives": sum(counter.counts.values()), "counts": dict(counter.counts),
                             "stats_bytes": opt.comm_stats["bytes_sent"] - stats0["bytes_sent"]}  # fmt: skip
            ref = [p.detach() - s for p, s in zip(models["unsharded"].parameters(), starts["unsharded"])]
            for name in ("implicit", "owner"):
                upd = [(p.full_tensor() if hasattr(p, "full_tensor") else p.detach()) - s for p, s in zip(models[name].parameters(), starts[name])]
                row[name]["rel_err"] = max(float((u - r).norm() / r.norm()) for u, r in zip(upd, ref))
            # Timed steps, alternating the order of the three paths.
            names = list(opts)
            samples = {n: [] for n in names}
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    dist.barrier()
                    samples[name].append(_time(opts[name], args.reps))
            for name in names:
                row[name]["cpu"] = [c for c, _ in samples[name]]
                row[name]["wall"] = [w for _, w in samples[name]]
            # Bytes of the matrices the owner path moves (sharded on a matrix dim), for the world-size projection.
            row["matrix_sharded_bytes"] = sum(
                p.numel() * p.element_size() for p in models["owner"].parameters() if not opts["owner"]._layouts[p].whole_matrices_local
            )
            out[(ns_dtype, layout_name)] = row
    results[rank] = out
    dist.barrier()
    dist.destroy_process_group()


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.1f} ({min(xs) * 1e3:.1f}–{max(xs) * 1e3:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtypes", default="auto,float32", help="ns_dtype values to run")
    parser.add_argument("--output", default=str(ROOT / "docs" / "aurora_bench_sharded.md"))
    args = parser.parse_args()
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(world, port, args, results), nprocs=world, join=True)
    wall = time.time() - t0
    import transformers

    cpu = platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    auto = str(resolve_ns_dtype("auto", torch.device("cpu"))).replace("torch.", "")
    lines = [
        "# Aurora on sharded (FSDP2 / DTensor) parameters",
        "",
        f"Command: `HF_HUB_OFFLINE=1 python benchmarks/bench_aurora_sharded.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        (
            f"Hardware: {cpu}, {world} processes × 1 thread, gloo. Versions: Python {platform.python_version()}, torch "
            f"{torch.__version__}, transformers {transformers.__version__}. Load average at the end: {load:.1f} (shared "
            f"machine). `ns_dtype=\"auto\"` is {auto} here. Wall time {wall:.0f} s."
        ),
        "",
        (
            "Parameters: one scaled Qwen3-30B-A3B decoder layer (bench_aurora.py §1: `q_proj` [512, 256], `k_proj`/`v_proj` "
            "[64, 256], `o_proj` [256, 512], experts `gate_up_proj` [8, 192, 256], `down_proj` [8, 256, 96]), fp32, "
            "`fully_shard` over 2 ranks. Bytes: what one rank sends per step (ring algorithms; all-to-all measured "
            "exactly), counted at the dispatcher by `hf_slim.optim.sharded.CollectiveCounter` (includes the one small "
            "all-reduce of the finiteness check). Step time: CPU ms of each rank's one-thread process, median over "
            f"{args.rounds} alternated rounds × {args.reps} steps and both ranks (min–max). `rel. error`: largest relative "
            "difference of a parameter's update from the unsharded one."
        ),
        "",
    ]
    for key in results[0]:
        ns_dtype, layout = key
        rows = [results[r][key] for r in range(world)]
        base = statistics.median(rows[0]["unsharded"]["cpu"] + rows[1]["unsharded"]["cpu"])
        lines += [f"## ns_dtype={ns_dtype}; {layout}", ""]
        lines += ["| path | bytes sent / rank / step | collectives / step | CPU ms / step (spread) | ÷ unsharded step | wall ms / step | rel. error vs unsharded |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name in ("unsharded", "implicit", "owner"):
            cpu_all = rows[0][name]["cpu"] + rows[1][name]["cpu"]
            wall_all = rows[0][name]["wall"] + rows[1][name]["wall"]
            b = max(r[name]["bytes"] for r in rows)
            err = "–" if name == "unsharded" else f"{max(r[name]['rel_err'] for r in rows):.1e}"
            lines.append(f"| {name} | {b:,.0f} | {rows[0][name]['collectives']} | {_ms(cpu_all)} | "
                         f"{statistics.median(cpu_all) / base:.2f} | {_ms(wall_all)} | {err} |")  # fmt: skip
        lines.append("")
        imp, own = max(r["implicit"]["bytes"] for r in rows), max(r["owner"]["bytes"] for r in rows)
        s_bytes = rows[0]["matrix_sharded_bytes"]
        lines += [
            (
                f"Implicit collectives by op: {rows[0]['implicit']['counts']}; owner path: {rows[0]['owner']['counts']}. "
                f"Matrices sharded on a matrix dim (the ones the owner path moves): {s_bytes / 1e6:.2f} MB."
            ),
            "",
            (
                "Projection to W ranks (same layer; bytes per rank per step). Owner path: each rank sends the pieces of "
                "the momentum-combined gradient of the matrices others own and receives back the update pieces of its "
                "own, `≈ 2·(W−1)/W² · S` plus the row corrections, so it falls as 1/W (at W=2 it equals an all-gather). "
                "Implicit path, assuming DTensor inserts the same collectives at any W: its all-gathers and all-reduces "
                "move `(W−1)/W` and `2(W−1)/W` of a fixed size, so its bytes grow by `2(W−1)/W` from the W=2 figure and "
                "approach twice it. \"All-gather once\" (every rank gathers every matrix and computes all of them): "
                "`(W−1)/W · S`. Compute per rank: the owner path runs about 1/W of the Newton–Schulz work (balanced by "
                "cost, as far as the number of matrices allows), the others all of it. Only W=2 was measured."
            ),
            "",
            "| W | owner path | implicit | all-gather once |",
            "|---:|---:|---:|---:|",
        ]
        for w in (2, 4, 8, 64):
            lines.append(f"| {w} | {own * 4 * (w - 1) / w**2:,.0f} | {imp * 2 * (w - 1) / w:,.0f} | {s_bytes * (w - 1) / w:,.0f} |")
        lines.append("")
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
