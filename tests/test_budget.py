"""Pruning to a parameter budget: the resolved sizes fit the budget and are as close to it as the rounding allows,
deterministically, for several families; PruneConfig carries budgets through `resolve` and `prune`; bad budgets
fail in one sentence with the numbers."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import pytest
import torch
from transformers import AutoConfig, Qwen3MoeConfig

sys.path.insert(0, os.path.dirname(__file__))
from test_anatomy import FAMILY_KWARGS, tiny_model, token_batch  # noqa: E402

from hf_slim.pruning import (  # noqa: E402
    PruneConfig,
    calibration_loss,
    collect_statistics,
    count_parameters_for,
    prune,
    resolve_budget,
    save_pruned,
    search_budget,
    size_summary,
)
from hf_slim.pruning.budget import format_param_count, parse_param_count  # noqa: E402
from hf_slim.utils import count_parameters  # noqa: E402

FAMILIES = ["qwen3_moe", "mixtral", "slim_moe", "olmoe"]
X = token_batch(8, 32)


def tiny_config(family: str, **overrides):
    import hf_slim  # noqa: F401  (registers slim_moe)

    kwargs = dict(FAMILY_KWARGS[family], **overrides)
    return AutoConfig.for_model(kwargs.pop("model_type", family), **kwargs)


def qwen3_30b_a3b() -> Qwen3MoeConfig:
    """Qwen/Qwen3-30B-A3B's published sizes."""
    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        max_position_embeddings=40960, tie_word_embeddings=False, norm_topk_prob=True,
    )


def step_up(config, sizes, axis, value):
    """`sizes` with `axis` at `value` and what follows from it (OLMoE: the heads follow the hidden size)."""
    out = {**sizes, axis: value}
    if config.model_type == "olmoe" and axis == "hidden_size":
        group = config.num_attention_heads // config.num_key_value_heads
        out["num_attention_heads"] = value // config.head_dim
        out["num_key_value_heads"] = out["num_attention_heads"] // group
    return out


def assert_fits_and_maximal(config, search, t_total=None, t_active=None):
    """Within the budget, counted independently; and within the rounding tolerance: no chosen axis can take its next
    allowed size without breaking a budget."""
    counts = count_parameters_for(config, search.sizes)
    assert (counts["total"], counts["active"]) == (search.total, search.active)
    assert t_total is None or search.total <= t_total
    assert t_active is None or search.active <= t_active
    assert search.allowed
    for axis, values in search.allowed.items():
        i = values.index(search.sizes[axis])
        if i + 1 == len(values):
            continue
        up = count_parameters_for(config, step_up(config, search.sizes, axis, values[i + 1]))
        assert (t_total is not None and up["total"] > t_total) or (t_active is not None and up["active"] > t_active), (
            axis, values[i + 1], up
        )


# ---- the rule -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [("total", 0.6), ("total", 0.85), ("active", 0.7), ("both", (0.75, 0.9))])
def test_resolved_sizes_fit_the_budget_within_the_rounding(family, budget):
    config = tiny_config(family)
    source = count_parameters_for(config)
    kind, value = budget
    t_total = round(source["total"] * (value[0] if kind == "both" else value)) if kind != "active" else None
    t_active = round(source["active"] * (value[1] if kind == "both" else value)) if kind != "total" else None
    search = search_budget(config, target_total_params=t_total, target_active_params=t_active)
    assert_fits_and_maximal(config, search, t_total, t_active)
    assert (search.source_total, search.source_active) == (source["total"], source["active"])
    if kind == "active":  # experts do not change what runs per token: an active budget leaves them alone
        assert "num_experts" not in search.sizes
    if family == "olmoe" and "hidden_size" in search.sizes:  # OLMoE: hidden_size == heads * head_dim
        assert search.sizes["hidden_size"] == search.sizes["num_attention_heads"] * config.head_dim
    assert search_budget(config, target_total_params=t_total, target_active_params=t_active) == search  # deterministic
    again = resolve_budget(tiny_config(family), target_total_params=t_total, target_active_params=t_active)
    assert again == search.sizes


def test_rounding_steps_and_the_source_size():
    search = search_budget(qwen3_30b_a3b(), target_total_params="20B")
    assert search.allowed["hidden_size"][:3] == (64, 128, 192) and search.allowed["hidden_size"][-1] == 2048
    assert search.allowed["moe_intermediate_size"][-2:] == (704, 768)
    assert search.allowed["num_experts"][0] == 8 and all(v % 8 == 0 for v in search.allowed["num_experts"])
    assert search.allowed["num_hidden_layers"] == tuple(range(1, 49))
    assert "intermediate_size" not in search.allowed  # no dense layer in Qwen3-30B-A3B: not a budget axis
    # a tiny model's steps shrink so that every axis has some room, widths staying multiples of 8
    tiny = search_budget(tiny_config("qwen3_moe"), target_total_params=0.7)
    assert tiny.allowed["hidden_size"] == (8, 16, 24, 32) and tiny.allowed["moe_intermediate_size"] == (8, 16)


def test_qwen3_30b_a3b_to_20b_total_on_the_meta_device_quickly():
    config = qwen3_30b_a3b()
    start = time.perf_counter()
    search = search_budget(config, target_total_params="20B")
    elapsed = time.perf_counter() - start
    assert (search.source_total, search.source_active) == (30_532_122_624, 3_353_032_704)  # the published 30.5B / 3.3B
    assert set(search.sizes) == {"num_hidden_layers", "hidden_size", "moe_intermediate_size", "num_experts"}
    assert 19.5e9 < search.total <= 20e9
    assert elapsed < 30, elapsed
    assert_fits_and_maximal(config, search, t_total=20 * 10**9)
    # both budgets: the active one shrinks depth / width, the total one then picks the expert count
    both = search_budget(config, target_total_params="20B", target_active_params="2.5B", axes=None)
    assert_fits_and_maximal(config, both, 20 * 10**9, 25 * 10**8)
    assert both.sizes["num_experts"] < 128 and both.active > 2.4e9


def test_fixed_sizes_are_kept_and_named_axes_only_are_chosen():
    config = qwen3_30b_a3b()
    sizes = resolve_budget(config, target_total_params="20B", fixed={"num_experts": 96, "num_experts_per_tok": 6},
                           axes=["hidden_size", "num_attention_heads"])
    assert sizes["num_experts"] == 96 and sizes["num_experts_per_tok"] == 6
    assert set(sizes) == {"hidden_size", "num_attention_heads", "num_experts", "num_experts_per_tok"}
    assert sizes["num_attention_heads"] % 4 == 0  # whole heads in every KV group, every KV head kept
    assert count_parameters_for(config, sizes)["total"] <= 20 * 10**9


def test_budget_with_kv_heads_drops_whole_groups():
    config = tiny_config("qwen3_moe")
    search = search_budget(config, target_total_params=0.8, axes=["num_key_value_heads", "hidden_size"])
    kv, heads = search.sizes["num_key_value_heads"], search.sizes["num_attention_heads"]
    assert heads == kv * 2  # the source groups hold 2 query heads each


# ---- errors ---------------------------------------------------------------------------------------------------
def test_budget_errors_are_one_sentence_with_the_numbers():
    config = qwen3_30b_a3b()
    with pytest.raises(ValueError, match=r"target_total_params='40B': above the source model's 30.53B total"):
        resolve_budget(config, target_total_params="40B")
    with pytest.raises(ValueError, match=r"target_total_params=1.00B: below the smallest model .*num_experts=8"):
        resolve_budget(config, target_total_params="1B", axes=["num_experts"])
    with pytest.raises(ValueError, match=r"target_active_params=3.00B is above target_total_params=2.00B"):
        resolve_budget(config, target_total_params="2B", target_active_params="3B")
    with pytest.raises(ValueError, match=r"budget_axes: intermediate_size does not change the parameter count"):
        resolve_budget(config, target_total_params="20B", axes=["intermediate_size"])
    with pytest.raises(ValueError, match=r"budget_axes: 'width' is not a size field"):
        resolve_budget(config, target_total_params="20B", axes=["width"])
    with pytest.raises(ValueError, match=r"budget_axes: hidden_size is also fixed to 1024"):
        resolve_budget(config, target_total_params="20B", axes=["hidden_size"], fixed={"hidden_size": 1024})
    with pytest.raises(ValueError, match=r"no axis is left for the budget to choose"):
        resolve_budget(config, target_total_params="20B", fixed={"num_hidden_layers": 40, "hidden_size": 1024,
                                                                 "moe_intermediate_size": 512, "num_experts": 64})
    with pytest.raises(ValueError, match=r"give target_total_params or target_active_params"):
        resolve_budget(config)
    with pytest.raises(ValueError, match=r"candidates=3: scoring candidates needs score_fn"):
        resolve_budget(config, target_total_params="20B", candidates=3)
    with pytest.raises(ValueError, match=r"fixed: hidden_size=4096: must be an int in \[1, 2048\]"):
        resolve_budget(config, target_total_params="20B", fixed={"hidden_size": 4096})


def test_two_budgets_that_cannot_hold_together():
    # SlimMoe's MTP block counts in the total, not in the active count: at the active budget, even the fewest
    # experts leave more total parameters than that same number
    config = tiny_config("slim_moe")
    active = count_parameters_for(config)["active"]
    t = round(active * 0.9)
    with pytest.raises(ValueError, match=r"cannot both be met: at .* active parameters even the fewest experts "
                                         r"allowed \(2\) leave .* total; raise target_total_params"):
        resolve_budget(config, target_total_params=t, target_active_params=t)


@pytest.mark.parametrize(
    "value, expected",
    [(20_000_000_000, 20 * 10**9), ("20B", 20 * 10**9), ("3.5b", 35 * 10**8), ("800M", 8 * 10**8),
     ("1.2e9", 12 * 10**8), ("20_000", 20_000), (" 2 T ", 2 * 10**12), ("3.5 B", 35 * 10**8), (0.5, 0.5),
     ("0.25", 0.25)],
)
def test_parameter_counts_as_users_write_them(value, expected):
    assert parse_param_count(value) == expected
    if isinstance(expected, float):
        assert parse_param_count(value, 1000) == round(expected * 1000)


@pytest.mark.parametrize("value", ["20X", "", "-3B", 0, 2.5, True, [1], "1.5", float("nan")])
def test_bad_parameter_counts(value):
    with pytest.raises(ValueError, match=r"^target_total_params="):
        parse_param_count(value)


def test_format_param_count():
    assert [format_param_count(n) for n in (30_532_122_624, 3_353_032_704, 812_400_000, 999)] == [
        "30.53B", "3.35B", "812.40M", "999"
    ]


# ---- PruneConfig and prune ------------------------------------------------------------------------------------------
def test_prune_config_budget_fields_validate_and_round_trip():
    config = PruneConfig(target_total_params="20B", target_active_params=0.8, budget_axes="hidden_size, num_experts")
    assert config.budget_axes == ["hidden_size", "num_experts"] and not config.is_noop and config.has_budget
    assert PruneConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"target_active_params='3 bn': not a parameter count"):
        PruneConfig(target_active_params="3 bn")
    with pytest.raises(ValueError, match=r"budget_axes=\['hidden_size'\]: set target_total_params"):
        PruneConfig(budget_axes=["hidden_size"])
    with pytest.raises(ValueError, match=r"budget_axes: hidden_size is also set to 1536"):
        PruneConfig(target_total_params="20B", hidden_size=1536, budget_axes=["hidden_size"])
    with pytest.raises(ValueError, match=r"budget_axes: 'depth' is not a size field"):
        PruneConfig(target_total_params="20B", budget_axes=["depth"])


def test_prune_config_resolve_returns_the_chosen_sizes():
    config = qwen3_30b_a3b()
    plan = PruneConfig(target_total_params="20B", num_experts_per_tok=6, hidden_size=0.875)
    targets = plan.resolve(config)
    assert targets["num_experts_per_tok"] == 6 and targets["hidden_size"] == 1792  # fixed, as given
    assert {"num_hidden_layers", "moe_intermediate_size", "num_experts"} <= set(targets)
    sizes = {**targets}
    assert count_parameters_for(config, sizes)["total"] <= 20 * 10**9
    assert plan.resolve(config) == targets


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_to_a_budget_end_to_end(family, tmp_path):
    model = tiny_model(family)
    stats = collect_statistics(model, X, num_samples=8, max_length=32, batch_size=8, show_progress=False)
    target = round(count_parameters(model)["total"] * 0.7)
    plan = PruneConfig(target_total_params=target)
    small = prune(model, plan, stats)
    counts = count_parameters(small)
    assert counts["total"] <= target
    search = search_budget(model, target_total_params=target)
    assert (counts["total"], counts["active"]) == (search.total, search.active)
    assert small.hf_slim_pruning_report["targets"] == plan.resolve(model.config)
    with torch.no_grad():
        assert torch.isfinite(small(X[:2]).logits).all()
    if family == "qwen3_moe":  # pruning_config.json records the budget as given and the sizes it chose
        save_pruned(small, tmp_path / "out", prune_config=plan, before=size_summary(model))
        record = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
        assert record["prune_config"]["target_total_params"] == target
        assert record["report"]["targets"] == plan.resolve(model.config)
        assert record["after"]["total_params"] == counts["total"]


def test_block_influence_counts_the_layers_it_keeps():
    # the tiny qwen3_moe alternates dense and sparse layers: which layers stay changes the count
    model = tiny_model("qwen3_moe")
    stats = collect_statistics(model, X, num_samples=8, max_length=32, batch_size=8, show_progress=False)
    for k in (1, 2, 3):
        expected = count_parameters(
            prune(model, PruneConfig(num_hidden_layers=k, depth_method="block_influence"), stats)
        )
        counted = count_parameters_for(model, {"num_hidden_layers": k}, depth_method="block_influence", stats=stats)
        assert (counted["total"], counted["active"]) == (expected["total"], expected["active"])


# ---- candidates -----------------------------------------------------------------------------------------------
def test_candidates_trade_depth_for_width_and_the_best_score_wins():
    config = qwen3_30b_a3b()
    seen = []

    def prefer_depth(sizes):
        seen.append(dict(sizes))
        return -sizes["num_hidden_layers"]

    search = search_budget(config, target_total_params="20B", candidates=5, score_fn=prefer_depth)
    assert len(search.candidates) == 5 and len(seen) == 5 and search.trade_axis == "num_hidden_layers"
    layers = [c.sizes["num_hidden_layers"] for c in search.candidates]
    assert len(set(layers)) == 5 and layers[0] == search_budget(config, target_total_params="20B").sizes[
        "num_hidden_layers"]
    assert search.sizes["num_hidden_layers"] == max(layers) and search.candidates[search.best].score == -max(layers)
    for c in search.candidates:
        assert c.total <= 20 * 10**9
    table = search.to_markdown()
    assert table.count("\n") == 6 and "best" in table and "20B" not in table
    assert resolve_budget(config, target_total_params="20B", candidates=5, score_fn=prefer_depth) == search.sizes


def test_candidates_scored_by_calibration_loss():
    model = tiny_model("qwen3_moe")
    stats = collect_statistics(model, X, num_samples=8, max_length=32, batch_size=8, show_progress=False)
    target = round(count_parameters(model)["total"] * 0.7)

    def loss(sizes):
        return calibration_loss(prune(model, PruneConfig(**sizes), stats), X, batch_size=4)

    search = search_budget(model, target_total_params=target, candidates=3, score_fn=loss)
    assert len(search.candidates) >= 2
    scores = [c.score for c in search.candidates]
    assert search.candidates[search.best].score == min(scores)
    assert all(math.isfinite(s) for s in scores) and math.isfinite(calibration_loss(model, X))
