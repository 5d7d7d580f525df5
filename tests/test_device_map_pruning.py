"""The in-memory path on models loaded with `dtype=` and `device_map=` (accelerate): calibration statistics, `prune`
and `save_pruned` agree with the same model loaded plainly, offloaded modules included, and what cannot run fails
with one clear sentence."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from test_anatomy import tiny_model, token_batch  # noqa: E402

from hf_slim.pruning import PruneConfig, collect_statistics, prune, save_pruned, size_summary  # noqa: E402

X = token_batch(4, 32)
FAMILIES = ["qwen3_moe", "slim_moe"]  # a stock family, and SlimMoe with an MTP head (shared experts, a dense layer)
#: experts merged (the fused expert tensors are rewritten), hidden, expert width and depth all pruned at once
CONFIG = PruneConfig(
    num_hidden_layers=3, hidden_size=24, moe_intermediate_size=8, num_experts=6, expert_strategy="merge"
)
# layers 1-2 (and the head) offloaded to the disk, the rest in memory; SlimMoe also has its embeddings and MTP head
# on the disk, so the inputs' device comes from hf_device_map and the MTP block loads its weights through a hook
DEVICE_MAPS = {
    "qwen3_moe": {
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
        "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk",
    },
    "slim_moe": {
        "model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
        "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu", "mtp": "disk",
    },
}  # fmt: skip


def stats_of(model):
    return collect_statistics(model, X, num_samples=4, max_length=32, batch_size=2, show_progress=False)


def logits(model):
    with torch.no_grad():
        return model(X[:2]).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny model, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("sources")
    for family in FAMILIES:
        tiny_model(family).save_pretrained(root / family)
    return root


def load(saved, family, **kwargs):
    return AutoModelForCausalLM.from_pretrained(saved / family, **kwargs).eval()


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        if shard.name != "importance_stats.safetensors":
            out.update(load_file(shard))
    return out


def assert_same_folder(a: Path, b: Path) -> None:
    """Bitwise the same weights, the same config and the same pruning record."""
    ta, tb = folder_tensors(a), folder_tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    for file in ("config.json", "pruning_config.json"):
        assert json.loads((a / file).read_text()) == json.loads((b / file).read_text()), file


def assert_same_stats(a, b, rtol=0.0, atol=0.0) -> None:
    assert sorted(a.tensors) == sorted(b.tensors)
    for key in a.tensors:
        assert a[key].dtype == torch.float32, key  # accumulated in float32 whatever the model's dtype
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)
    assert a.metadata == b.metadata


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_model_keeps_bf16_compute_and_prunes_like_the_in_memory_cast(saved, family, tmp_path):
    loaded = load(saved, family, dtype=torch.bfloat16)
    cast = load(saved, family).to(torch.bfloat16)  # the fp32 model cast to bf16 in memory
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    seen = []
    experts = next(m for n, m in loaded.named_modules() if n.endswith("mlp.experts"))
    handle = experts.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    stats = stats_of(loaded)
    handle.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the patched experts forward computes in bf16
    # The weights are bitwise those of the cast; `.to(bf16)` also casts the RoPE frequencies, which from_pretrained
    # keeps in float32, so the statistics agree to bf16 precision: within 2% of each statistic's scale. (Per-expert
    # means over routed tokens are left out: a token whose top-k ties flip in bf16 moves between experts.)
    reference = stats_of(cast)
    assert sorted(stats.tensors) == sorted(reference.tensors) and stats.metadata == reference.metadata
    assert {t.dtype for t in stats.tensors.values()} == {torch.float32}  # accumulated in float32
    for key, value in stats.tensors.items():
        if key not in ("expert.count", "expert.frequency", "expert.soft", "expert.mean_output", "expert_ffn.act"):
            scale = reference[key].abs().max().clamp_min(1e-6)
            assert (value - reference[key]).abs().max() <= 0.02 * scale, key

    small, reference = prune(loaded, CONFIG, stats), prune(cast, CONFIG, stats)  # one selection for both
    assert {p.dtype for p in small.parameters()} == {torch.bfloat16}
    assert small.config.dtype == torch.bfloat16
    ref_state = reference.state_dict()
    assert sorted(ref_state) == sorted(small.state_dict())
    for name, t in small.state_dict().items():
        assert t.dtype == ref_state[name].dtype and torch.equal(t, ref_state[name]), name
    save_pruned(small, tmp_path / "a", prune_config=CONFIG, stats=stats)
    save_pruned(reference, tmp_path / "b", prune_config=CONFIG, stats=stats)
    assert_same_folder(tmp_path / "a", tmp_path / "b")
    assert {t.dtype for t in folder_tensors(tmp_path / "a").values()} == {torch.bfloat16}


def _disk_offloaded(saved, family, tmp_path):
    model = load(saved, family, device_map=DEVICE_MAPS[family], offload_folder=str(tmp_path / "offload"))
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
    return model


def _cpu_offloaded(saved, family, tmp_path):
    """Layers 1 and 2 CPU-offloaded by accelerate: their weights are meta, a hook loads them from a CPU copy."""
    model = load(saved, family)
    for i in (1, 2):
        cpu_offload(model.model.layers[i], execution_device=torch.device("cpu"))
    return model


def offloaded_experts(model):
    """The first routed-experts module whose weights are offloaded."""
    return next(m for n, m in model.named_modules() if n.endswith("mlp.experts") and m.gate_up_proj.device.type == "meta")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("offload", [_disk_offloaded, _cpu_offloaded], ids=["disk", "cpu_offload"])
def test_offloaded_model_calibrates_prunes_and_saves_like_the_plain_model(saved, family, offload, tmp_path):
    plain = load(saved, family)
    model = offload(saved, family, tmp_path)
    experts = offloaded_experts(model)
    wrapper = experts.forward  # accelerate's: loads the offloaded weights around the module's own forward
    reference = stats_of(plain)
    stats = stats_of(model)  # the calibration experts forward loaded the weights itself: they are meta outside it
    assert_same_stats(stats, reference, rtol=1e-5, atol=1e-6)
    if family == "slim_moe":  # the MTP block ran (its weights offloaded too) and has its row
        assert stats.metadata["blocks"][-1] == "mtp.layers.0" and stats["expert.frequency"][-1].sum() > 0
    assert experts.forward is wrapper and experts.gate_up_proj.device.type == "meta"  # as accelerate left them
    torch.testing.assert_close(logits(model), logits(plain), rtol=0, atol=0)

    small = prune(model, CONFIG, stats)
    expected = prune(plain, CONFIG, reference)
    assert small.hf_slim_pruning_report == expected.hf_slim_pruning_report
    # the source is untouched (still offloaded), the pruned model whole on the CPU, in the source dtype
    assert experts.gate_up_proj.device.type == "meta"
    assert {p.device.type for p in small.parameters()} | {b.device.type for b in small.buffers()} == {"cpu"}
    assert {p.dtype for p in small.parameters()} == {torch.float32}
    torch.testing.assert_close(logits(small), logits(expected), rtol=0, atol=0)
    before_sizes = size_summary(model)
    assert before_sizes == size_summary(plain)
    save_pruned(small, tmp_path / "a", prune_config=CONFIG, before=before_sizes, stats=stats)
    save_pruned(expected, tmp_path / "b", prune_config=CONFIG, before=before_sizes, stats=reference)
    assert_same_folder(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_device_map_dispatches_the_pruned_model(saved, family, tmp_path):
    plain = load(saved, family)
    stats = stats_of(plain)
    expected = prune(plain, CONFIG, stats)
    save_pruned(expected, tmp_path / "expected", prune_config=CONFIG)
    # the pruned model has 3 decoder layers: its own module names
    device_map = dict(DEVICE_MAPS[family])
    del device_map["model.layers.3"]
    small = prune(plain, CONFIG, stats, device_map=device_map, offload_folder=tmp_path / "offload")
    assert small.hf_device_map == device_map
    assert offloaded_experts(small) is not None  # on the disk
    torch.testing.assert_close(logits(small), logits(expected), rtol=0, atol=0)
    save_pruned(small, tmp_path / "dispatched", prune_config=CONFIG)
    assert_same_folder(tmp_path / "dispatched", tmp_path / "expected")
    for device_map in ("auto", "cpu"):  # a machine without GPUs: everything on the CPU
        placed = prune(plain, CONFIG, stats, device_map=device_map)
        assert {p.device.type for p in placed.parameters()} == {"cpu"}
        torch.testing.assert_close(logits(placed), logits(expected), rtol=0, atol=0)


def test_weights_nobody_loads_and_bad_placement_fail_clearly(saved, tmp_path):
    config = load(saved, "qwen3_moe").config
    with torch.device("meta"):  # a model without weights: nothing would load them
        empty = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"^model\.embed_tokens: .*meta device.*collect_statistics\(path"):
        stats_of(empty)
    with pytest.raises(ValueError, match=r"^model\.embed_tokens: .*meta device.*prune_checkpoint"):
        prune(empty, PruneConfig(num_hidden_layers=2))
    plain = load(saved, "qwen3_moe")
    depth = PruneConfig(num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"puts \['model.layers.1'\] on the disk; pass offload_folder="):
        prune(plain, depth, device_map={"model": "cpu", "model.layers.1": "disk", "lm_head": "cpu"})
    with pytest.raises(ValueError, match="pass device_map= with them"):
        prune(plain, depth, max_memory={"cpu": "1GB"})
    with pytest.raises(ValueError, match="is one device"):
        prune(plain, depth, device_map="cpu", offload_folder=tmp_path)
    with pytest.raises(TypeError, match="device_map must be"):
        prune(plain, depth, device_map=["cpu"])

