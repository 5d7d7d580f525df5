"""SlimMoe's tensor- and expert-parallel plans, the way transformers shards a model (issue 13).

- Every parameter of tiny SlimMoe models (each qk_norm kind, shared expert gated / ungated / none, dense layers, MTP
  depths with or without the shared MTP norm, tied / untied embeddings, softmax or grouped sigmoid routing) is named
  by the merged TP plan or replicated on purpose (RMSNorms, the router, the 1-wide shared-expert gate); every expert
  tensor by the EP plan; no rule of either plan names nothing.
- One launch of 2 CPU processes (gloo; `_parallel_plans_script.py`) loads saved checkpoints sharded by the plans
  (`tp_plan="auto"`; `DistributedConfig(tp_size=2, ep_size=2)`; `DistributedConfig(fsdp_size=2, ep_size=2)`) and
  compares logits, MTP logits, loss and every gradient with the single-process model. The gradients are what catch
  a wrong replicated entry: per-head q/k norms without their gradient all-reduce give the same logits.
"""

from __future__ import annotations

import json
import re
from itertools import chain
from pathlib import Path

import pytest
import torch
from _launch import launch_two_processes
from test_slim_moe import tiny_config
from transformers.distributed import DistributedConfig
from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES

from hf_slim.models.slim_moe import SlimMoeForCausalLM
from hf_slim.models.slim_moe.modeling_slim_moe import SlimMoeExperts, SlimMoeRMSNorm
from hf_slim.models.slim_moe.routing_slim_moe import SlimMoeTopKRouter


SCRIPT = Path(__file__).with_name("_parallel_plans_script.py")
ATOL = 1e-5

# case -> (config overrides on test_slim_moe.tiny_config with 4 experts, from_pretrained kwargs in the launch)
CASES = {
    # per-head q/k norm, gated shared expert, a dense middle layer, 2 MTP depths, untied head, grouped_mm experts
    "head": (dict(), {}),
    # OLMoE's full-width q/k norm, GLM-4-MoE's ungated shared expert and grouped sigmoid routing, tied head, biases
    "full": (
        dict(
            qk_norm="full", shared_expert_gated=False, router_scoring="sigmoid", n_group=2, topk_group=1,
            routed_scaling_factor=2.5, tie_word_embeddings=True, attention_bias=True, attention_output_bias=True,
            num_mtp_heads=1, partial_rotary_factor=0.5,
        ),
        {"experts_implementation": "eager"},
    ),
    # no q/k norm, no shared expert, every layer sparse, no MTP, clipped q/k/v
    "plain": (
        dict(qk_norm=None, shared_expert_intermediate_size=0, mlp_layer_types=None, num_mtp_heads=0, clip_qkv=0.5),
        {"experts_implementation": "batched_mm"},
    ),
    # a dense first layer, per-layer expert widths, the first MTP layout's shared norm
    "dense_first": (
        dict(mlp_layer_types=["dense", "sparse", "sparse"], moe_intermediate_size=[16, 16, 8], mtp_shared_norm=True),
        {},
    ),
}  # fmt: skip
MODES = ("tp", "ep", "ep_fsdp")


def build(case: str) -> SlimMoeForCausalLM:
    """The case's model with non-trivial norms and correction biases (ones and zeros would hide a wrong shard)."""
    torch.manual_seed(0)
    model = SlimMoeForCausalLM(tiny_config(num_experts=4, **CASES[case][0]))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SlimMoeRMSNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(0.1 * torch.randn_like(bias))
    return model


def generic(name: str) -> str:
    """`name` with its layer numbers as `*`, as plan keys spell them (transformers' rule)."""
    return re.sub(r"\.\d+(\.|$)", r".*\1", name)


def plan_style(param: str, plan: dict[str, str]) -> str | None:
    """The style transformers gives parameter `param`: its own entry, else its module's."""
    name = generic(param)
    return plan.get(name, plan.get(name.rpartition(".")[0]))


def replicated_on_purpose(param: str, modules: dict) -> bool:
    """RMSNorms, the router and the 1-wide shared-expert gate: replicated inputs, so whole gradients on each rank."""
    module = modules[param.rpartition(".")[0]]
    return isinstance(module, (SlimMoeRMSNorm, SlimMoeTopKRouter)) or param.endswith("shared_expert_gate.weight")


def dead_rules(model: SlimMoeForCausalLM, plan: dict[str, str]) -> list[str]:
    names = {generic(name) for name, _ in chain(model.named_modules(), model.named_parameters())}
    return sorted(plan.keys() - names)


# ---- the plans, in one process ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_tp_plan_covers_every_parameter(case):
    model = build(case)
    plan, modules = model.tp_plan, dict(model.named_modules())
    params = [name for name, _ in model.named_parameters()]
    uncovered = [n for n in params if plan_style(n, plan) is None and not replicated_on_purpose(n, modules)]
    assert not uncovered, f"parameters neither in the TP plan nor replicated on purpose: {uncovered}"
    # what is replicated on purpose is never sharded (the per-head q/k norms get their gradient summed)
    sharded = [n for n in params if replicated_on_purpose(n, modules) and plan_style(n, plan) is not None]
    assert all(plan_style(n, plan) == "replicated_with_grad_allreduce" for n in sharded), sharded
    assert plan["lm_head"] == "colwise_gather_output" and plan["model.embed_tokens"] == "embedding_rowwise"
    assert not dead_rules(model, plan)
    assert all(style in ALL_PARALLEL_STYLES for style in [*plan.values(), *model.ep_plan.values()])


@pytest.mark.parametrize("case", CASES)
def test_ep_plan_covers_every_expert_parameter(case):
    model = build(case)
    plan = model.ep_plan
    experts = {name for name, module in model.named_modules() if isinstance(module, SlimMoeExperts)}
    assert experts and all(plan.get(generic(name)) == "ep_dispatch_experts" for name in experts)
    expert_params = [n for n, _ in model.named_parameters() if n.rpartition(".")[0] in experts]
    uncovered = [n for n in expert_params if plan_style(n, plan) != "grouped_gemm"]
    assert not uncovered, f"expert parameters the EP plan does not shard by expert: {uncovered}"
    others = [n for n, _ in model.named_parameters() if n not in expert_params and plan_style(n, plan) is not None]
    assert not others, f"EP plan entries on non-expert parameters: {others}"
    assert any(n.startswith("mtp.") for n in expert_params) == bool(model.config.num_mtp_heads)
    assert not dead_rules(model, plan)


def test_attention_plan_follows_qk_norm():
    config = tiny_config()
    for kind in ("head", None):
        config.qk_norm = kind  # a property of the config: it follows later edits too
        plan = config.base_model_tp_plan
        assert [plan[f"layers.*.self_attn.{p}_proj"] for p in "qkvo"] == ["colwise"] * 3 + ["rowwise"]
        norms = [plan.get(f"layers.*.self_attn.{n}_norm") for n in "qk"]
        assert norms == (["replicated_with_grad_allreduce"] * 2 if kind else [None, None])
    # a norm over the whole projected width cannot run on a shard of it: gather q/k/v (OLMoE's plan)
    config.qk_norm = "full"
    plan = config.base_model_tp_plan
    assert [plan[f"layers.*.self_attn.{p}_proj"] for p in "qkvo"] == ["colwise_gather_output"] * 3 + [
        "rowwise_split_input"
    ]
    assert not any("norm" in key for key in plan)
    assert "base_model_tp_plan" not in config.to_dict() and "base_model_ep_plan" not in config.to_dict()


def test_eager_experts_skip_expert_parallel_sentinels():
    # EP marks the routes to another rank's experts with index num_experts (weight 0); the eager loop must skip them
    model = build("head")
    model.set_experts_implementation("eager")
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(5, 32)
    index = torch.tensor([[0, 4], [4, 1], [2, 3], [4, 4], [1, 0]])
    weights = torch.rand(5, 2).masked_fill(index == 4, 0.0)
    with torch.no_grad():
        got = experts(hidden, index, weights)
        want = experts(hidden, index.clamp(max=3), weights)  # the same routes, weighted 0
    torch.testing.assert_close(got, want)


def test_elastic_variants_refuse_tensor_parallel_shards():
    model = SlimMoeForCausalLM(tiny_config(elastic={"variants": {"small": {"num_experts": 4, "hidden_size": 16}}}))
    model.config.distributed_config = DistributedConfig(tp_size=2)
    with pytest.raises(ValueError, match="prefix views"), model.elastic_variant("small"):
        pass
    with pytest.raises(ValueError, match="prefix views"):
        model.slice_variant("small")
    with model.elastic_variant("full"):
        pass


# ---- 2 CPU processes -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    data = tmp_path_factory.mktemp("plans_data")
    for case in CASES:
        build(case).save_pretrained(data / case)
    (data / "cases.json").write_text(json.dumps({case: kwargs for case, (_, kwargs) in CASES.items()}))
    out = tmp_path_factory.mktemp("plans_out")
    ranks = launch_two_processes(SCRIPT, out, timeout=300, args=(str(data),))
    assert [r["world_size"] for r in ranks] == [2, 2]
    return {"ranks": [r["results"] for r in ranks]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_sharded_model_matches_single_process(launched, case, mode):
    for rank, results in enumerate(launched["ranks"]):
        result = results[f"{case}/{mode}"]
        assert result["logits"] < ATOL and result["mtp_logits"] < ATOL and result["loss"] < ATOL, (rank, result)
        assert result["mtp_depths"][0] == result["mtp_depths"][1] == CASES[case][0].get("num_mtp_heads", 2)
        assert not result["grads_missing"], result["grads_missing"]
        wrong = {name: diff for name, diff in result["grads"].items() if diff >= ATOL}
        assert not wrong, f"rank {rank}: gradients off the single-process ones: {wrong}"


@pytest.mark.parametrize("case", CASES)
def test_ranks_hold_the_shards_the_plans_name(launched, case):
    model = build(case)
    config, plan = model.config, model.tp_plan
    params = dict(model.named_parameters())
    styled = {n for n in params if plan_style(n, plan) not in (None, "replicated_with_grad_allreduce")}
    for results in launched["ranks"]:
        tp, ep = results[f"{case}/tp"]["sharded"], results[f"{case}/ep"]["sharded"]
        # the same tensors are split either way: experts on their FFN width (TP) or whole by expert (EP)
        assert set(tp) == set(ep) == styled
        for name, local in tp.items():
            if name.endswith("experts.gate_up_proj"):
                full = list(params[name].shape)
                assert local == [full[0], full[1] // 2, full[2]] and ep[name] == [full[0] // 2, *full[1:]]
            elif name.endswith("experts.down_proj"):
                full = list(params[name].shape)
                assert local == [*full[:2], full[2] // 2] and ep[name] == [full[0] // 2, *full[1:]]
        assert tp["model.layers.0.self_attn.k_proj.weight"][0] == config.num_key_value_heads * config.head_dim // 2
