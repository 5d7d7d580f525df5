"""collect_statistics: one pass leaves the model's function alone, statistics are right on hand-checkable cases,
round-trip through safetensors, and bad input fails clearly."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_anatomy import FAMILIES, byte_ids, real_text, tiny_model, token_batch  # noqa: E402

from hf_slim.pruning import ImportanceStats, collect_statistics, pack_calibration_data  # noqa: E402

X = token_batch(8, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_pass_matches_plain_forward_and_shapes(family):
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(X).logits
    seen = []
    handle = model.register_forward_hook(lambda m, a, out: seen.append(out.logits.detach()))
    stats = collect_statistics(model, X, num_samples=8, max_length=32, batch_size=4, show_progress=False)
    handle.remove()
    torch.testing.assert_close(torch.cat(seen), ref, rtol=1e-5, atol=1e-5)
    c = model.config
    L, H = c.num_hidden_layers + getattr(c, "num_mtp_heads", 0), c.hidden_size  # MTP blocks come last
    assert stats["hidden.norm_abs_mean"].shape == (L, 2, H)
    if getattr(c, "num_mtp_heads", 0):  # the MTP blocks ran during calibration
        assert stats["expert.frequency"][-1].sum() > 0 and stats.metadata["blocks"][-1].startswith("mtp.layers.")
    assert stats["expert.frequency"].shape == (L, 8)
    sparse = stats["layer.sparse"].bool()
    # every token picks exactly top-k experts in a sparse layer
    torch.testing.assert_close(stats["expert.frequency"].sum(-1)[sparse], torch.full((int(sparse.sum()),), 2.0))
    torch.testing.assert_close(stats["expert.soft"].sum(-1)[sparse], torch.ones(int(sparse.sum())))
    assert stats.num_tokens == X.numel()
    # the patched experts and the hooks are gone afterwards
    assert all("forward" not in vars(m) for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules() if m is not model)


def test_statistics_values_on_a_hand_checkable_case():
    model = tiny_model("mixtral")
    stats = collect_statistics(model, X, num_samples=8, max_length=32, batch_size=8, show_progress=False)
    layer0 = model.model.layers[0]
    captured = {}

    def keep(key, value):  # hooks must return None, or they would replace inputs/outputs
        captured[key] = value

    h1 = layer0.post_attention_layernorm.register_forward_hook(lambda m, a, o: keep("norm", o))
    h2 = layer0.mlp.gate.register_forward_hook(lambda m, a, o: keep("router", o))
    h3 = layer0.register_forward_pre_hook(lambda m, a, k: keep("in", a[0] if a else k["hidden_states"]),
                                          with_kwargs=True)
    h4 = layer0.register_forward_hook(lambda m, a, o: keep("out", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(X)
    for h in (h1, h2, h3, h4):
        h.remove()
    norm = captured["norm"]
    torch.testing.assert_close(stats["hidden.norm_abs_mean"][0, 1], norm.abs().mean(dim=(0, 1)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["hidden.minitron"][0, 1], norm.mean(1).norm(dim=0), rtol=1e-5, atol=1e-6)
    _, weights, idx = captured["router"]
    freq = torch.bincount(idx.flatten(), minlength=8).float() / X.numel()
    torch.testing.assert_close(stats["expert.frequency"][0], freq)
    bi = (1 - torch.nn.functional.cosine_similarity(captured["in"], captured["out"], dim=-1)).mean()
    torch.testing.assert_close(stats["layer.block_influence"][0], bi, rtol=1e-5, atol=1e-6)
    # REAP for one expert, recomputed by hand: mean over its tokens of gate weight * ||expert output||
    e = int(idx[:, 0].mode().values)
    experts = layer0.mlp.experts
    xs = norm.reshape(-1, norm.shape[-1])
    rows, pos = torch.where(idx == e)
    gate, up = torch.nn.functional.linear(xs[rows], experts.gate_up_proj[e]).chunk(2, dim=-1)
    y = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
    reap = (weights[rows, pos] * y.norm(dim=-1)).mean()
    torch.testing.assert_close(stats["expert.reap"][0, e], reap.detach(), rtol=1e-4, atol=1e-6)


def test_stats_round_trip(tmp_path):
    model = tiny_model("qwen2_moe")
    stats = collect_statistics(model, X, num_samples=4, max_length=32, batch_size=4, show_progress=False)
    path = stats.save(tmp_path / "stats.safetensors")
    back = ImportanceStats.load(path)
    assert back.metadata == stats.metadata
    assert set(back.tensors) == set(stats.tensors)
    for k in stats.tensors:
        torch.testing.assert_close(back[k], stats[k], rtol=0, atol=0)
    with open(path, "rb") as f:  # safetensors, not a pickle
        assert b"hf_slim_stats" in f.read(4096)
    back.check_compatible(model.config)
    other = tiny_model("qwen2_moe", hidden_size=48)
    with pytest.raises(ValueError, match="hidden_size=32"):
        back.check_compatible(other.config)


def test_data_forms_and_empty_set():
    texts = real_text()[:40]
    packed = pack_calibration_data(texts, tokenizer=byte_ids, num_samples=3, max_length=16)
    assert packed.shape == (3, 16)
    assert packed.flatten().tolist() == [t for s in texts for t in byte_ids(s)][:48]
    from datasets import Dataset

    ds = Dataset.from_dict({"text": texts})
    assert torch.equal(pack_calibration_data(ds, tokenizer=byte_ids, num_samples=3, max_length=16), packed)
    with pytest.raises(ValueError, match="calibration set is empty"):
        pack_calibration_data([], num_samples=4, max_length=16)
    with pytest.raises(ValueError, match="tokenizer"):
        pack_calibration_data(["some text"], num_samples=1, max_length=4)
    with pytest.raises(ValueError, match="num_samples=0"):
        pack_calibration_data(texts, tokenizer=byte_ids, num_samples=0, max_length=4)


def test_grouped_kernel_and_loop_fallback_agree():
    """With the default `grouped_mm` experts the pass uses the same grouped kernel; with `eager` experts it loops per
    expert. Both give the same statistics and the same outputs."""
    model = tiny_model("qwen3_moe")
    from hf_slim.pruning.calibration import _grouped_linear_kernel

    experts = model.model.layers[1].mlp.experts
    assert _grouped_linear_kernel(experts) is not None
    grouped = collect_statistics(model, X, num_samples=8, max_length=32, batch_size=8, show_progress=False)
    model.config._experts_implementation = "eager"  # the experts share the model's config object
    assert _grouped_linear_kernel(experts) is None
    looped = collect_statistics(model, X, num_samples=8, max_length=32, batch_size=8, show_progress=False)
    for key in ("expert.reap", "expert_ffn.act", "expert.mean_output", "hidden.norm_abs_mean"):
        torch.testing.assert_close(looped[key], grouped[key], rtol=1e-4, atol=1e-5)
