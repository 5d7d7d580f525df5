"""Aurora on FSDP2 (DTensor) parameters: 2 CPU processes over gloo, compared with the unsharded optimizer.

One launch of tests/_aurora_sharded_script.py (about 20 s) feeds every test here; the single-process tests at the
bottom cover the pieces that need no process group.
"""

from pathlib import Path

import pytest
import torch
from _launch import launch_two_processes

from hf_slim.optim import Aurora
from hf_slim.optim.sharded import assign_owners, chunk_sizes, polar_cost


SCRIPT = Path(__file__).with_name("_aurora_sharded_script.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch_two_processes(SCRIPT, tmp_path_factory.mktemp("aurora_sharded"), timeout=600)


@pytest.mark.parametrize("preset", ["default", "default_fp32", "reference", "muon", "default_no_carry_wd"])
def test_sharded_update_equals_unsharded(ranks, preset):
    for result in ranks:
        run = result["presets"][preset]
        # Tall, wide, odd-sized (uneven Shard(0)), square, 3D experts split on E (2 + 1 experts) and 3D sharded on a
        # matrix dim (Shard(2)): all as FSDP2 laid them out, all within 1e-6 of the unsharded update after 3 steps.
        assert run["placements"]["experts.down_proj"] == "(Shard(dim=2),)"
        assert run["placements"]["odd.weight"] == "(Shard(dim=0),)"
        bad = {name: err for name, err in run["errors"].items() if not err <= 1e-6}
        assert not bad, bad
        # Two all-to-alls per step (to the owners and back) and nothing else.
        assert run["comm"]["collectives"] == 2 * 3


def test_sharded_row_balance_kept(ranks):
    for result in ranks:
        default, muon = result["row_balance"]["default"], result["row_balance"]["muon"]
        assert default["rel_err"] <= 1e-6 and muon["rel_err"] <= 1e-6
        assert default["ratio_sharded"] == pytest.approx(default["ratio_ref"], rel=1e-6)
        # Same bound as the unsharded test (test_default_balances_rows_after_a_few_steps_with_carried_scale).
        assert default["ratio_sharded"] < 1.3
        assert muon["ratio_sharded"] > 3


def test_owner_path_moves_fewer_bytes_than_implicit_redistribution(ranks):
    for result in ranks:
        b = result["bytes"]
        # Our own count and the dispatch-level count agree up to the one small all-reduce of the finiteness check.
        assert 0 < b["ours_stats"] <= b["ours_counted"] <= b["ours_stats"] + 1024
        assert b["ours_counts"] == {"allreduce_": 1, "alltoall_base_": 2}
        assert b["implicit"] > 10 * b["ours_counted"]
        assert sum(b["implicit_counts"].values()) > 50


def test_sharded_aurora_lora_equals_unsharded(ranks):
    for result in ranks:
        lora = result["lora"]
        assert lora["placements"] == ["(Shard(dim=0),)"]
        assert len(lora["errors"]) == 12
        bad = {name: err for name, err in lora["errors"].items() if not err <= 1e-6}
        assert not bad, bad
        assert lora["comm"]["collectives"] == 2 * 3


def test_resume_parameter_swap_and_replicate(ranks):
    for result in ranks:
        misc = result["misc"]
        assert misc["row_scale_is_dtensor"]  # carried state is sharded like the parameters (DCP-friendly)
        assert misc["resume"] <= 1e-6
        # accelerate-style: optimizer built on plain parameters, then handed the FSDP2 DTensors.
        assert misc["swap"] <= 1e-6 and misc["swap_layouts"] == 8
        assert misc["replicate"] <= 1e-6 and misc["replicate_collectives"] == 0


def test_unsupported_layout_names_the_parameter(ranks):
    msgs = ranks[0]["bad_layouts"]
    assert "'model.layers.0.hsdp.weight'" in msgs["hsdp"] and "(Replicate(), Shard(dim=0))" in msgs["hsdp"]
    assert "2-D device mesh" in msgs["hsdp"]
    assert "'model.layers.0.partial.weight'" in msgs["partial"] and "Partial" in msgs["partial"]
    assert "use_aurora=False" in msgs["partial"]
    assert "'m.lora_A.default.weight' / 'm.lora_B.default.weight'" in msgs["lora_mixed"]
    assert "(Shard(dim=0),) / (Replicate(),)" in msgs["lora_mixed"]


# ---- pieces that need no process group ----


def test_chunk_sizes_follow_torch_chunk():
    for n in (0, 1, 3, 7, 16, 37):
        for world in (1, 2, 3, 4, 8):
            expected = [c.shape[0] for c in torch.arange(n).chunk(world)] if n else []
            expected += [0] * (world - len(expected))
            assert chunk_sizes(n, world) == expected, (n, world)


def test_owner_assignment_balances_cost():
    shapes = [(512, 256), (64, 256), (64, 256), (256, 512), (8, 192, 256), (8, 256, 96)]
    costs = [polar_cost(s) for s in shapes]
    owners = assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert max(loads) / min(loads) < 1.5
    assert assign_owners(costs, 2) == owners  # deterministic: every rank computes the same plan
    assert sorted(set(assign_owners(costs, 4))) == [0, 1, 2, 3]


def test_fused_batches_equal_separate_updates():
    # Same-shape matrices of different parameters are fused into one batch; the result equals separate optimizers.
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (48, 16), (2, 48, 16), (16, 48), (16, 16)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = Aurora(params, lr=0.05, weight_decay=0.1, ns_dtype="float32")
    separate = [Aurora([p], lr=0.05, weight_decay=0.1, ns_dtype="float32") for p in alone]
    for _ in range(3):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, q, G in zip(params, alone, grads):
            p.grad, q.grad = G.clone(), G.clone()
        fused.step()
        for opt in separate:
            opt.step()
    for p, q in zip(params, alone):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
