"""prune / PruneConfig / expert strategies / ProgressivePlan / Hub-ready output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from test_anatomy import FAMILIES, tiny_model, token_batch  # noqa: E402

from hf_slim.pruning import (  # noqa: E402
    ImportanceStats,
    ProgressivePlan,
    PruneConfig,
    collect_statistics,
    plan_selection,
    prune,
    save_pruned,
    size_summary,
)
from hf_slim.pruning.experts import ExpertPlan, merge_expert_rows, plan_experts  # noqa: E402
from hf_slim.pruning.scores import choose_heads, choose_layers  # noqa: E402

X = token_batch(8, 32)
_STATS: dict[str, tuple] = {}


def model_and_stats(family: str):
    if family not in _STATS:
        model = tiny_model(family)
        _STATS[family] = (model, collect_statistics(model, X, num_samples=8, max_length=32, batch_size=8,
                                                    show_progress=False))
    return _STATS[family]


def logits(model, x=X[:2]):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_everything_is_identity(family):
    model, stats = model_and_stats(family)
    c = model.config
    full = PruneConfig(
        num_hidden_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        num_experts=8, expert_strategy="merge",
    )
    torch.testing.assert_close(logits(prune(model, full, stats)), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_removes_lowest_scored_and_config_follows(family, tmp_path):
    model, stats = model_and_stats(family)
    kw = dict(num_experts=4, num_experts_per_tok=1, expert_strategy="reap", moe_intermediate_size=8,
              num_hidden_layers=3)
    if family == "olmoe":
        kw.update(hidden_size=16, num_attention_heads=2, num_key_value_heads=2)
    else:
        kw.update(hidden_size=24, num_attention_heads=2)
    small = prune(model, PruneConfig(**kw), stats)
    c = small.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_experts_per_tok) == (
        3, kw["hidden_size"], 2, 1
    )
    # exactly the lowest-REAP experts are gone, in every sparse layer
    blocks = stats.metadata["blocks"]  # statistics rows: decoder layers, then MTP layers
    for key, kept in small.hf_slim_pruning_report["experts"].items():
        row = key if isinstance(key, int) else blocks.index(key)
        reap = stats["expert.reap"][row]
        dropped = sorted(set(range(8)) - set(kept))
        assert reap[kept].min() >= reap[dropped].max()
    # hidden channels: the kept ones have the highest SlimQwen score
    score = stats["hidden.norm_abs_mean"].reshape(-1, 32)  # every RMSNorm, MTP blocks included
    score = torch.cat([score, stats["hidden.final_abs_mean"][None]]).mean(0)
    kept_h = torch.topk(score, kw["hidden_size"]).indices.sort().values
    torch.testing.assert_close(small.model.embed_tokens.weight, model.model.embed_tokens.weight[:, kept_h])
    small.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(back.eval()), logits(small), rtol=1e-6, atol=1e-6)


def test_expert_strategies_on_hand_built_scores():
    imp = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.2, 0.05])
    assert plan_experts(imp, 3, "frequency").kept.tolist() == [0, 2, 3]
    sim = torch.eye(6)
    sim[1, 2] = sim[2, 1] = 0.9  # 1 is closest to 2
    sim[4, 3] = sim[3, 4] = 0.8  # 4 is closest to 3
    sim[5, 0] = sim[0, 5] = 0.7  # 5 is closest to 0
    plan = plan_experts(imp, 3, "merge", sim)
    assert plan.kept.tolist() == [0, 2, 3]
    assert plan.groups == {0: [0, 5], 2: [2, 1], 3: [3, 4]}


def test_partial_preserve_follows_algorithm_1():
    # 8 experts, keep 4: S_keep = top 2 intact (7, 6); S_base = next 2 (5, 4); the rest merge into S_base only
    imp = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    sim = torch.eye(8)
    sim[0, 7] = sim[7, 0] = 0.99  # most similar to an intact expert, which must not receive merges
    sim[0, 5] = sim[5, 0] = 0.5
    sim[1, 4] = sim[4, 1] = 0.6
    sim[2, 4] = sim[4, 2] = 0.3
    sim[3, 5] = sim[5, 3] = 0.4
    plan = plan_experts(imp, 4, "partial_preserve", sim)
    assert plan.kept.tolist() == [4, 5, 6, 7]
    assert plan.groups[7] == [7] and plan.groups[6] == [6]
    assert plan.groups[5] == [5, 3, 0] and plan.groups[4] == [4, 2, 1]


def test_merging_one_group_is_the_weighted_average_and_identical_experts_are_lossless():
    w = torch.randn(4, 6, 5)
    imp = torch.tensor([3.0, 1.0, 0.0, 2.0])
    plan = ExpertPlan(kept=torch.tensor([0, 2]), groups={0: [0, 1, 3], 2: [2]})
    out = merge_expert_rows(w, plan, imp)
    torch.testing.assert_close(out[0], (3 * w[0] + 1 * w[1] + 2 * w[3]) / 6)
    torch.testing.assert_close(out[2], w[2])
    same = w[:1].expand(4, -1, -1).clone()
    torch.testing.assert_close(merge_expert_rows(same, plan, imp)[0], same[0])


def test_merge_of_identical_experts_keeps_the_model_function():
    """Experts 4..7 are exact twins of 0..3 (router rows too). Twins share their tokens at random (top-k ties), so
    the importance is set by hand to rank every original above every twin. Merging each twin into its original by
    router-weight similarity averages equal weights, and top-1 routing then sends each token to a function-identical
    expert: the model is unchanged."""
    model = tiny_model("mixtral", num_experts_per_tok=1)
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.experts.gate_up_proj[4:] = mlp.experts.gate_up_proj[:4]
            mlp.experts.down_proj[4:] = mlp.experts.down_proj[:4]
            mlp.gate.weight[4:] = mlp.gate.weight[:4]
    stats = collect_statistics(model, X, num_samples=8, max_length=32, batch_size=8, show_progress=False)
    freq = stats["expert.frequency"]
    pair = freq[:, :4] + freq[:, 4:]  # <= 1
    stats.tensors["expert.frequency"] = torch.cat([1 + pair, pair], dim=1)
    small = prune(model, PruneConfig(num_experts=4, expert_strategy="merge", merge_similarity="router_weight"), stats)
    assert all(kept == [0, 1, 2, 3] for kept in small.hf_slim_pruning_report["experts"].values())
    for groups in small.hf_slim_pruning_report["merges"].values():
        assert groups == {0: [0, 4], 1: [1, 5], 2: [2, 6], 3: [3, 7]}
    torch.testing.assert_close(logits(small), logits(model), rtol=1e-5, atol=1e-5)


def test_heads_and_layers_choosers():
    score = torch.tensor([1.0, 5.0, 2.0, 3.0, 0.5, 0.1, 9.0, 0.2])  # 4 KV groups of 2
    assert choose_heads(score, 4, 4, 4).tolist() == [1, 3, 4, 6]  # best head of every group
    assert choose_heads(score, 4, 4, 2).tolist() == [0, 1, 6, 7]  # best two groups (0: 6.0, 3: 9.2)
    stats = ImportanceStats({"layer.block_influence": torch.tensor([0.9, 0.1, 0.5, 0.3, 0.2, 0.8])})
    assert choose_layers(6, 4, "last").tolist() == [0, 1, 2, 3]
    assert choose_layers(6, 3, "block_influence", stats).tolist() == [0, 2, 5]
    types = ["linear", "linear", "full", "linear", "linear", "full"]
    # 2 of 4 linear, 1 of 2 full: ratio kept
    assert choose_layers(6, 3, "block_influence", stats, types).tolist() == [0, 3, 5]


def test_qwen3_next_depth_keeps_layer_types_consistent():
    model, stats = model_and_stats("qwen3_next")
    small = prune(model, PruneConfig(num_hidden_layers=2, depth_method="block_influence"), stats)
    assert sorted(small.config.layer_types) == ["full_attention", "linear_attention"]
    mixers = [type(getattr(layer, "self_attn", None) or layer.linear_attn).__name__ for layer in small.model.layers]
    assert mixers == [
        "Qwen3NextGatedDeltaNet" if t == "linear_attention" else "Qwen3NextAttention" for t in small.config.layer_types
    ]


def test_prune_config_validation_names_the_field():
    cases = [
        (dict(num_experts=0), "num_experts=0"),
        (dict(hidden_size=1.5), "hidden_size=1.5"),
        (dict(num_experts_per_tok=0.5), "num_experts_per_tok=0.5"),
        (dict(num_experts=2, num_experts_per_tok=4), "num_experts_per_tok=4"),
        (dict(expert_strategy="random"), "expert_strategy='random'"),
        (dict(depth_method="first"), "depth_method='first'"),
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads=6"),
        (dict(num_hidden_layers=True), "num_hidden_layers=True"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
            PruneConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown field"):
        PruneConfig.from_dict({"num_expert": 4})
    pc = PruneConfig(num_experts=0.5, hidden_size=24, expert_strategy="partial_preserve")
    assert PruneConfig.from_dict(json.loads(pc.to_json_string())) == pc


def test_bad_targets_against_the_model():
    model, stats = model_and_stats("qwen3_moe")
    with pytest.raises(ValueError, match="num_experts=16"):
        prune(model, PruneConfig(num_experts=16), stats)
    with pytest.raises(ValueError, match="num_experts_per_tok=4"):
        prune(model, PruneConfig(num_experts=3, num_experts_per_tok=4), stats)
    with pytest.raises(ValueError, match="num_attention_heads=3"):
        prune(model, PruneConfig(num_attention_heads=3), stats)
    with pytest.raises(ValueError, match="stats"):
        prune(model, PruneConfig(num_experts=4))
    olmoe, olmoe_stats = model_and_stats("olmoe")
    with pytest.raises(ValueError, match="hidden_size=24"):
        prune(olmoe, PruneConfig(hidden_size=24), olmoe_stats)
    with pytest.raises(ValueError, match="hidden_size=32"):  # statistics of another model
        prune(tiny_model("qwen3_moe", hidden_size=48, head_dim=8), PruneConfig(num_experts=4), stats)
    with pytest.raises(ValueError, match="no shared expert"):
        prune(model, PruneConfig(shared_expert_intermediate_size=8), stats)


def test_progressive_plan_depth_first():
    model, stats = model_and_stats("qwen2_moe")
    final = PruneConfig(num_hidden_layers=2, num_experts=4, hidden_size=24)
    plan = ProgressivePlan.depth_first(final, num_source_layers=4)
    assert plan.stages[0].num_hidden_layers == 3 and plan.stages[0].num_experts is None
    assert ProgressivePlan.from_dict(json.loads(plan.to_json_string())).to_dict() == plan.to_dict()
    calls = []

    def calibrate(m):
        calls.append(m.config.num_hidden_layers)
        return collect_statistics(m, X, num_samples=4, max_length=32, batch_size=4, show_progress=False)

    out = plan.run(model, calibrate, recover=lambda m, i: m)
    assert calls == [4, 3]
    assert (out.config.num_hidden_layers, out.config.num_experts, out.config.hidden_size) == (2, 4, 24)


def test_hub_ready_output_loads_in_stock_transformers(tmp_path, monkeypatch):
    model, stats = model_and_stats("qwen2_moe")
    pc = PruneConfig(num_experts=4, num_hidden_layers=3, hidden_size=24, expert_strategy="merge")
    small = prune(model, pc, stats)
    out = tmp_path / "pruned"
    save_pruned(small, out, prune_config=pc, before=size_summary(model), stats=stats, calibration="stdlib source")
    names = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "README.md", "pruning_config.json",
            "importance_stats.safetensors"} <= names
    assert any(n.endswith(".safetensors") and n.startswith("model") for n in names)
    record = json.loads((out / "pruning_config.json").read_text())
    assert PruneConfig.from_dict(record["prune_config"]) == pc
    assert record["before"]["num_experts"] == 8 and record["after"]["num_experts"] == 4
    card = (out / "README.md").read_text()
    for needle in ("library_name: transformers", "- pruned", "- hf-slim", "- moe", "pipeline_tag: text-generation",
                   "stdlib source", "| num_experts | 8 | 4 |"):
        assert needle in card
    # stock transformers, in a fresh interpreter that never imports hf_slim, loads and generates
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r});"
        "assert 'hf_slim' not in sys.modules;"
        "o = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False);"
        "print(type(m).__name__, o.shape[1])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                         "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["Qwen2MoeForCausalLM", "7"]
    # bad input is refused before anything is written; a failure half-way leaves nothing at the target either
    bad = tmp_path / "bad"
    with pytest.raises(TypeError, match="stats"):
        save_pruned(small, bad, prune_config=pc, stats="not stats")  # type: ignore[arg-type]
    assert not bad.exists()

    def broken_save(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(ImportanceStats, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(small, bad, prune_config=pc, stats=stats)
    assert not bad.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]


def test_plan_selection_is_inspectable_without_building():
    model, stats = model_and_stats("mixtral")
    sel, tensors, updates, report = plan_selection(model, PruneConfig(num_experts=6, num_experts_per_tok=1), stats)
    assert set(sel) == {"expert"} and tensors is None and updates == {"num_experts_per_tok": 1}
    assert all(len(v) == 6 for v in report["experts"].values())


def test_cli_prune_end_to_end(tmp_path, capsys):
    """`hf-slim prune` through the sub-parser: calibrate on a local text file, prune, Hub-ready output, table."""
    import argparse

    from test_anatomy import real_text
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hf_slim.cli.prune import add_prune_parser

    model, _ = model_and_stats("qwen3_moe")
    src = tmp_path / "src"
    model.save_pretrained(src)
    # byte-level tokenizer: ids 0..159 cover the bytes the text uses modulo the tiny vocabulary
    vocab = {chr(i): i for i in range(160)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0)).save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(real_text()))
    parser = argparse.ArgumentParser()
    add_prune_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "prune", str(src), str(tmp_path / "out"), "--num-experts", "4", "--hidden-size", "0.75",
        "--expert-strategy", "partial_preserve", "--calibration", str(text), "--num-samples", "4",
        "--max-length", "32", "--save-stats",
    ])
    assert args.handler(args) == 0
    shown = capsys.readouterr().out
    assert "num_experts" in shown and "before" in shown and "0.50x" in shown
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.config.num_experts == 4 and back.config.hidden_size == 24
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert (tmp_path / "out" / "importance_stats.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "out", "src"]  # calibration work files gone
    # replay: the saved pruning_config.json and statistics reproduce the same model without calibrating again
    again = parser.parse_args(["prune", str(src), str(tmp_path / "again"), "--config",
                               str(tmp_path / "out" / "pruning_config.json"), "--stats",
                               str(tmp_path / "out" / "importance_stats.safetensors")])
    assert again.handler(again) == 0
    replay = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(logits(replay.eval()), logits(back.eval()), rtol=0, atol=0)
    bad = parser.parse_args(["prune", str(src), str(tmp_path / "bad"), "--num-experts", "16",
                             "--calibration", str(text)])
    with pytest.raises(ValueError, match="num_experts=16"):
        bad.handler(bad)
    assert not (tmp_path / "bad").exists()


# ---- SlimMoe with MTP heads: the report keys decoder layers by int and MTP blocks by prefix ----------------------

from hf_slim.pruning.config import _CHOICES  # noqa: E402  (the strategies PruneConfig accepts)

_MTP: dict[str, tuple] = {}


def mtp_model_and_stats():
    """A tiny SlimMoe with 2 MTP heads (sparse decoder layers 0, 2, 3; layer 1 dense) and its statistics."""
    if not _MTP:
        model = tiny_model("slim_moe", num_mtp_heads=2)
        _MTP["slim_moe"] = (model, collect_statistics(model, X, num_samples=8, max_length=32, batch_size=8,
                                                      show_progress=False))
    return _MTP["slim_moe"]


def _json_keys(mapping: dict) -> dict:
    """What JSON makes of a report mapping: every key a string, nested mappings too."""
    return {str(k): _json_keys(v) if isinstance(v, dict) else v for k, v in mapping.items()}


def test_pruning_record_orders_mixed_keys_numerically_then_blocks():
    from hf_slim.pruning.export import _json_ready

    report = {"mtp.layers.10": [1], 10: [2], "mtp.layers.2": [3], 2: {7: [7, 1], 3: [3]}, 0: (4, 5)}
    ready = _json_ready(report)
    assert list(ready) == ["0", "2", "10", "mtp.layers.2", "mtp.layers.10"]
    assert list(ready["2"]) == ["3", "7"] and ready["0"] == [4, 5]
    with pytest.raises(ValueError, match="clashes"):
        _json_ready({1: [1], "1": [2]})
    with pytest.raises(TypeError, match=r"keyed by int or str, got float"):
        _json_ready({1.5: [1]})


@pytest.mark.parametrize("strategy", _CHOICES["expert_strategy"])
def test_expert_pruning_of_mtp_model_saves_and_reloads(strategy, tmp_path):
    """Every expert strategy on a SlimMoe with MTP heads: `save_pruned` writes the report with decoder layers in
    numeric order then the MTP blocks, and the folder loads through the Auto classes with the same outputs."""
    model, stats = mtp_model_and_stats()
    pc = PruneConfig(num_experts=4, expert_strategy=strategy)
    small = prune(model, pc, stats)
    report = small.hf_slim_pruning_report
    out = tmp_path / "pruned"
    save_pruned(small, out, prune_config=pc, before=size_summary(model), stats=stats)
    text = (out / "pruning_config.json").read_text()
    record = json.loads(text)
    assert PruneConfig.from_dict(record["prune_config"]) == pc
    assert record["before"]["num_experts"] == 8 and record["after"]["num_experts"] == 4
    order = ["0", "2", "3", "mtp.layers.0", "mtp.layers.1"]
    assert list(record["report"]["experts"]) == order
    assert record["report"]["experts"] == _json_keys(report["experts"])
    assert all(len(kept) == 4 for kept in record["report"]["experts"].values())
    if strategy in ("merge", "partial_preserve"):
        assert list(record["report"]["merges"]) == order
        assert record["report"]["merges"] == _json_keys(report["merges"])
        for groups in record["report"]["merges"].values():
            assert list(groups) == sorted(groups, key=int)
    else:
        assert "merges" not in record["report"]
    # the written order is the file's own: re-dumping what was read changes nothing (stable across saves)
    assert json.dumps(record, indent=2) + "\n" == text
    assert "| num_experts | 8 | 4 |" in (out / "README.md").read_text()
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (back.config.num_experts, back.config.num_mtp_heads) == (4, 2)
    torch.testing.assert_close(logits(back), logits(small), rtol=1e-6, atol=1e-6)


def test_cli_replays_pruning_config_of_mtp_model(tmp_path):
    """`hf-slim prune --config pruning_config.json --stats ...` reads back a record with MTP block keys."""
    import argparse

    from hf_slim.cli.prune import add_prune_parser

    model, stats = mtp_model_and_stats()
    src = tmp_path / "src"
    model.save_pretrained(src)
    pc = PruneConfig(num_experts=4, expert_strategy="partial_preserve")
    small = prune(model, pc, stats)
    save_pruned(small, tmp_path / "out", prune_config=pc, stats=stats)
    parser = argparse.ArgumentParser()
    add_prune_parser(parser.add_subparsers(dest="command"))
    again = parser.parse_args(["prune", str(src), str(tmp_path / "again"), "--config",
                               str(tmp_path / "out" / "pruning_config.json"), "--stats",
                               str(tmp_path / "out" / "importance_stats.safetensors")])
    assert again.handler(again) == 0
    replay = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    torch.testing.assert_close(logits(replay), logits(small), rtol=0, atol=0)
    first = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    second = json.loads((tmp_path / "again" / "pruning_config.json").read_text())
    assert second["report"] == first["report"] and second["prune_config"] == first["prune_config"]


def test_pruned_model_shares_no_storage_with_the_source():
    """Tensors no axis touches (embeddings after a depth-only cut) are copies: training the pruned model in place
    leaves the source as it was."""
    model, _ = model_and_stats("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = prune(model, PruneConfig(num_hidden_layers=1))
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_a_width_the_default_experts_kernel_cannot_run_is_warned(caplog):
    """transformers' grouped_mm experts kernel needs 16-byte aligned rows: a stock Qwen3-MoE of hidden size 30 fails
    at its first forward unless it runs the eager experts, so a target that is not a multiple of 8 is warned."""
    import logging

    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hf_slim.pruning.config"):
        assert PruneConfig(hidden_size=24, moe_intermediate_size=8).resolve(config) == {
            "hidden_size": 24, "moe_intermediate_size": 8,
        }  # fmt: skip
        assert not caplog.text
        PruneConfig(hidden_size=30, moe_intermediate_size=12).resolve(config)
    assert "hidden_size=30, moe_intermediate_size=12: not a multiple of 8" in caplog.text
    assert "experts_implementation='eager'" in caplog.text
