"""Run by tests/test_aurora_sharded.py on 2 CPU processes (gloo): Aurora and Aurora-LoRA on FSDP2 parameters.

Every check compares against the unsharded optimizer run in the same process on a copy of the model.
Writes `OUT_DIR/rank{r}.json`.
"""

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from hf_slim.optim import AURORA_PRESETS, Aurora, AuroraLoRA, aurora_lora_param_groups, aurora_param_groups, aurora_update
from hf_slim.optim.sharded import CollectiveCounter, dtensor_layout


sys.path.insert(0, str(Path(__file__).parent))


class Net(nn.Module):
    """Tall, wide, odd-sized (uneven shards), square, and two fused 3D expert tensors, plus 1D parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 24, bias=True)  # weight [24, 16] tall
        self.tall = nn.Linear(24, 64, bias=True)  # [64, 24] tall
        self.wide = nn.Linear(64, 20, bias=False)  # [20, 64] wide
        self.odd = nn.Linear(20, 37, bias=False)  # [37, 20]: shards of 19 and 18 rows
        self.square = nn.Linear(37, 37, bias=False)
        self.norm = nn.LayerNorm(37)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.randn(3, 40, 37) * 0.1)  # E=3: 2 and 1 whole experts per rank
        self.experts.down_proj = nn.Parameter(torch.randn(4, 37, 20) * 0.1)  # sharded on a matrix dim (below)
        self.head = nn.Linear(37, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.odd(self.wide(torch.relu(self.tall(torch.relu(self.inp(x))))))
        h = self.norm(h + self.square(h))
        up = torch.relu(torch.einsum("bd,eod->beo", h, self.experts.gate_up_proj))[..., :20]  # 3 experts
        h = h + torch.einsum("beo,edo->bd", up, self.experts.down_proj[:3]) / 3 + self.experts.down_proj[3].sum(-1)
        return self.head(h)


def _shard(model: Net) -> Net:
    # The down projection is sharded on its input dim (FSDP2 allows uneven shards on dim 0 only), so a 3D tensor also takes the owner path.
    fully_shard(model, shard_placement_fn=lambda p: Shard(2) if p is model.experts.down_proj else None)
    return model


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(32, 16, generator=g), torch.randint(0, 8, (32,), generator=g)) for _ in range(steps)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> None:
    for x, y in batches:
        # Every rank sees the same batch, so FSDP2's averaged gradient equals the single-process one exactly.
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _rel_update_errors(start: dict, ref: nn.Module, sharded: nn.Module) -> dict[str, float]:
    errors = {}
    for (name, p_ref), (_, p_sh) in zip(ref.named_parameters(), sharded.named_parameters()):
        d_ref = p_ref.detach() - start[name]
        d_sh = _full(p_sh) - start[name]
        errors[name] = float((d_sh - d_ref).norm() / d_ref.norm().clamp(min=1e-30))
    return errors


def check_presets(rank: int) -> dict:
    out = {}
    for label, kwargs in {
        "default": {},
        "default_fp32": {"ns_dtype": "float32"},
        "reference": {k: v for k, v in AURORA_PRESETS["reference"].items()},
        "muon": dict(AURORA_PRESETS["muon"]),
        "default_no_carry_wd": {"carry_row_scale": False, "weight_decay": 0.1},
    }.items():
        kwargs = {"lr": 0.02, **kwargs}
        torch.manual_seed(0)
        ref = Net()
        start = {n: p.detach().clone() for n, p in ref.named_parameters()}
        sharded = _shard(copy.deepcopy(ref))
        opt_ref = Aurora(aurora_param_groups(ref), adamw_lr=1e-2, **kwargs)
        opt_sh = Aurora(aurora_param_groups(sharded), adamw_lr=1e-2, **kwargs)
        batches = _batches(3)
        _train(ref, opt_ref, batches)
        _train(sharded, opt_sh, batches)
        errors = _rel_update_errors(start, ref, sharded)
        placements = {n: str(tuple(p.placements)) for n, p in sharded.named_parameters()}
        out[label] = {"errors": errors, "comm": dict(opt_sh.comm_stats), "placements": placements}
    return out


def check_row_balance(rank: int) -> dict:
    """Skewed gradients on a tall matrix: the sharded update balances rows exactly as the unsharded one."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(3)
    m, n = 256, 64
    G = torch.randn(m, n, generator=g) * torch.exp(1.5 * torch.randn(m, 1, generator=g))
    out = {}
    for preset in ("default", "muon"):
        W0 = torch.zeros(m, n)
        p_ref = nn.Parameter(W0.clone())
        p_sh = nn.Parameter(distribute_tensor(W0.clone(), mesh, [Shard(0)]))
        opts = [Aurora.from_preset([p], preset, lr=1.0, ns_dtype="float32") for p in (p_ref, p_sh)]
        gen = torch.Generator().manual_seed(4)
        for _ in range(6):
            grad = G + 0.3 * G.std() * torch.randn(m, n, generator=gen)
            before = [_full(p_ref).clone(), _full(p_sh).clone()]
            p_ref.grad = grad.clone()
            p_sh.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)], src_data_rank=None)
            for opt in opts:
                opt.step()
            updates = [b - _full(p) for b, p in zip(before, (p_ref, p_sh))]
        rows = [u.norm(dim=1) for u in updates]
        ratios = [float(r.max() / r.min()) for r in rows]
        out[preset] = {"ratio_ref": ratios[0], "ratio_sharded": ratios[1],
                       "rel_err": float((updates[1] - updates[0]).norm() / updates[0].norm())}  # fmt: skip
    return out


def check_bytes(rank: int) -> dict:
    """Bytes one default step sends: the owner path vs DTensor's implicit redistribution (the plain update on DTensors)."""
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = _shard(Net())
    groups = aurora_param_groups(model)
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {p: p.grad.detach().clone() for p in model.parameters()}
    opt = Aurora(groups, ns_dtype="float32")
    with CollectiveCounter(world) as ours:
        opt.step()
    # The implicit path: the per-parameter update applied to the DTensors themselves (the code before issue 13).
    implicit = CollectiveCounter(world)
    matrices = [p for p in groups[0]["params"]]
    with torch.no_grad(), implicit:
        for _, p in matrices:
            aurora_update(grads[p], torch.zeros_like(p), ns_dtype="float32")
    return {"ours_counted": ours.bytes_sent, "ours_stats": opt.comm_stats["bytes_sent"], "ours_counts": ours.counts,
            "implicit": implicit.bytes_sent, "implicit_counts": implicit.counts}  # fmt: skip


def check_lora(rank: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from test_aurora_trainer import tiny_moe

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    ref = get_peft_model(tiny_moe(0), cfg)
    g = torch.Generator().manual_seed(5)
    for name, p in ref.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a random B makes both whitening factors matter
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    sharded = copy.deepcopy(ref)
    fully_shard(sharded)
    ids = torch.randint(1, 128, (4, 16), generator=g)
    out = {}
    opts = [AuroraLoRA(aurora_lora_param_groups(m), lr=0.02, adamw_lr=1e-2, ns_dtype="float32") for m in (ref, sharded)]
    for model, opt in zip((ref, sharded), opts):
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    errors = _rel_update_errors(start, ref, sharded)
    out["errors"] = {n: e for n, e in errors.items() if "lora_" in n}
    out["placements"] = sorted({str(tuple(p.placements)) for n, p in sharded.named_parameters() if "lora_" in n})
    out["comm"] = dict(opts[1].comm_stats)
    return out


def check_resume_swap_replicate(rank: int) -> dict:
    """State saved after 2 sharded steps and loaded into a new optimizer continues exactly; an optimizer built before
    `fully_shard` swapped its parameters (as accelerate does) still takes the sharded path; Replicate() works."""
    out = {}
    batches = _batches(4)
    torch.manual_seed(0)
    ref = Net()
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    opt_ref = Aurora(aurora_param_groups(ref), lr=0.02, adamw_lr=1e-2)
    _train(ref, opt_ref, batches)

    sharded = _shard(_fresh())
    opt = Aurora(aurora_param_groups(sharded), lr=0.02, adamw_lr=1e-2)
    _train(sharded, opt, batches[:2])
    saved = copy.deepcopy(opt.state_dict())
    out["row_scale_is_dtensor"] = all(isinstance(st["row_scale"], DTensor) for st in opt.state.values() if "row_scale" in st)
    resumed = Aurora(aurora_param_groups(sharded), lr=0.02, adamw_lr=1e-2)
    resumed.load_state_dict(saved)
    _train(sharded, resumed, batches[2:])
    out["resume"] = max(_rel_update_errors(start, ref, sharded).values())

    # Built on plain parameters, then the model is sharded and the optimizer's parameters swapped for the DTensors.
    model = _fresh()
    opt = Aurora(aurora_param_groups(model), lr=0.02, adamw_lr=1e-2)
    _shard(model)
    new = dict(model.named_parameters())
    for group in opt.param_groups:
        group["params"] = [new[name] for name in group["param_names"]]
    _train(model, opt, batches)
    out["swap"] = max(_rel_update_errors(start, ref, model).values())
    out["swap_layouts"] = len(opt._layouts)

    # Replicate(): every rank holds the whole matrix and computes it; no exchange.
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(9)
    W0, grads = torch.randn(40, 12, generator=g), [torch.randn(40, 12, generator=g) for _ in range(3)]
    p_ref, p_rep = nn.Parameter(W0.clone()), nn.Parameter(distribute_tensor(W0.clone(), mesh, [Replicate()]))
    opts = [Aurora([p], lr=0.05, weight_decay=0.1) for p in (p_ref, p_rep)]
    for G in grads:
        p_ref.grad, p_rep.grad = G.clone(), distribute_tensor(G.clone(), mesh, [Replicate()])
        for o in opts:
            o.step()
    out["replicate"] = float((p_rep.full_tensor() - p_ref.detach()).norm() / (p_ref.detach() - W0).norm())
    out["replicate_collectives"] = opts[1].comm_stats["collectives"]
    return out


def _fresh() -> Net:
    torch.manual_seed(0)
    return Net()


def check_bad_layouts(rank: int) -> dict:
    msgs = {}
    mesh2 = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("replicate", "shard"))
    hsdp = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh2, [Replicate(), Shard(0)]))
    mesh1 = init_device_mesh("cpu", (dist.get_world_size(),))
    partial = nn.Parameter(DTensor.from_local(torch.randn(8, 4), mesh1, [Partial()]))
    for label, p in (("hsdp", hsdp), ("partial", partial)):
        try:
            Aurora([(f"model.layers.0.{label}.weight", p)])
            msgs[label] = None
        except ValueError as e:
            msgs[label] = str(e)
    A = nn.Parameter(distribute_tensor(torch.randn(4, 32), mesh1, [Shard(0)]))
    B = nn.Parameter(distribute_tensor(torch.randn(48, 4), mesh1, [Replicate()]))
    try:
        AuroraLoRA([{"params": [("m.lora_A.default.weight", A), ("m.lora_B.default.weight", B)], "lora_scaling": [2.0]}])
        msgs["lora_mixed"] = None
    except ValueError as e:
        msgs["lora_mixed"] = str(e)
    # The same layouts are fine in an AdamW group (elementwise updates).
    Aurora([{"params": [hsdp], "use_aurora": False}])
    try:
        dtensor_layout(hsdp, "x")
    except ValueError as e:
        msgs["direct"] = str(e)
    return msgs


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result, seconds = {"world_size": dist.get_world_size()}, {}
    for name, check in (
        ("presets", check_presets),
        ("row_balance", check_row_balance),
        ("bytes", check_bytes),
        ("lora", check_lora),
        ("misc", check_resume_swap_replicate),
        ("bad_layouts", check_bad_layouts),
    ):
        t0 = time.perf_counter()
        result[name] = check(rank)
        seconds[name] = round(time.perf_counter() - t0, 2)
    result["seconds"] = seconds
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    # The result is written and every rank got here. Leave without the interpreter's teardown: on a loaded machine a
    # gloo thread of the device-mesh subgroups (check_bad_layouts' 2-D mesh) was once still running there, and a rank
    # aborted with "terminate called without an active exception" after its work was done (CI run of 2026-11-29).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
