"""GLM-4-MoE and DeepSeek-V3, the stock families whose checkpoints store MTP layers after the decoder layers: axes
specs that keep the function (MTP drafter included), calibration of the MTP layers in memory and layer by layer,
pruning that carries them (in memory and from disk, bitwise equal) so stock transformers still drafts with them, the
depth rule, the stored layout, and one-sentence errors for what the configs cannot hold."""

from __future__ import annotations

import filecmp
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from test_anatomy import token_batch  # noqa: E402

from hf_slim.anatomy import apply_selection, get_spec, select  # noqa: E402
from hf_slim.anatomy.mtp_blocks import attach_mtp_layers  # noqa: E402
from hf_slim.checkpoints import CheckpointReader, ShardedCheckpointWriter  # noqa: E402
from hf_slim.hub import run_without_hf_slim  # noqa: E402
from hf_slim.integrations.transformers_mtp import mtp_drafter, mtp_weights_found, run_mtp_depth  # noqa: E402
from hf_slim.pruning import (  # noqa: E402
    ImportanceStats,
    PruneConfig,
    collect_statistics,
    prune,
    prune_checkpoint,
    save_pruned,
    size_summary,
)

FAMILIES = ["glm4_moe", "deepseek_v3"]
VOCAB = 64
_MOE = dict(
    vocab_size=VOCAB, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, n_routed_experts=8,
    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
    max_position_embeddings=64, tie_word_embeddings=False, attention_bias=True,
)  # fmt: skip
CONFIGS = {
    "glm4_moe": dict(_MOE, num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_qk_norm=True),
    "deepseek_v3": dict(
        _MOE, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=10, qk_rope_head_dim=4,
        qk_nope_head_dim=6, v_head_dim=5,
    ),
}
#: the depth at which stock transformers finds each family's MTP layers (GLM-4.5-Air's, DeepSeek-V3's)
DECODABLE = {"glm4_moe": 46, "deepseek_v3": 61}
X = token_batch(4, 12) % VOCAB
KW = dict(num_samples=4, max_length=12, batch_size=3, show_progress=False)  # batches of 3 and 1 rows


def tiny(family: str, layers: int = 3, mtp: int = 2, seed: int = 0, **overrides):
    """A random model with `mtp` MTP layers attached after its `layers` decoder layers (DeepSeek-V3's with the
    embedding and head copies its checkpoints ship)."""
    kwargs = {**CONFIGS[family], "num_hidden_layers": layers, "num_nextn_predict_layers": mtp, **overrides}
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    extras = ("embed_tokens.weight", "shared_head.head.weight") if family == "deepseek_v3" else ()
    names = [f"model.layers.{layers + k}.{leaf}" for k in range(mtp) for leaf in ("enorm.weight", *extras)]
    for block in attach_mtp_layers(model, names):
        model.get_submodule(block).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("e_score_correction_bias"):
                t.copy_(0.05 * torch.randn(t.shape, generator=g))
            elif t.ndim == 1:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5)
    return model.eval()


def draft_logits(model, x=X[:2]) -> list[torch.Tensor]:
    """Every MTP depth's logits on `x`, teacher-forced, through transformers' drafter over the attached layers."""
    layers = model.model.layers
    blocks = [layers[i] for i in range(model.config.num_hidden_layers, len(layers))]
    drafter = mtp_drafter(model, blocks)
    with torch.no_grad():
        previous, out = model.model(x).last_hidden_state, []
        for k in range(len(blocks)):
            previous = run_mtp_depth(drafter, k, x, previous)
            out.append(model.lm_head(previous))
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


def _perm(n: int, g: torch.Generator, groups: int = 1) -> torch.Tensor:
    """A permutation of `n` that keeps `groups` consecutive groups whole (groups and members both shuffled)."""
    size = n // groups
    order = torch.randperm(groups, generator=g).tolist()
    return torch.cat([k * size + torch.randperm(size, generator=g) for k in order])


# ---- anatomy -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "overrides"), [("glm4_moe", {}), ("deepseek_v3", {}), ("deepseek_v3", {"q_lora_rank": None})]
)
def test_permuting_every_axis_keeps_the_model_and_its_mtp_layers(family, overrides):
    model = tiny(family, **overrides)
    c = model.config
    g = torch.Generator().manual_seed(1)
    blocks = list(range(c.num_hidden_layers + 2))  # decoder layers 0-2, MTP layers 3-4
    sparse, dense = blocks[c.first_k_dense_replace :], blocks[: c.first_k_dense_replace]
    kv_groups = c.num_key_value_heads if family == "glm4_moe" else c.num_attention_heads
    sel = {
        "hidden": torch.randperm(c.hidden_size, generator=g),
        "head": {b: _perm(c.num_attention_heads, g, kv_groups) for b in blocks},
        "expert": {b: _perm(c.n_routed_experts, g, c.n_group) for b in sparse},
        "expert_ffn": {b: torch.stack([torch.randperm(8, generator=g) for _ in range(8)]) for b in sparse},
        "shared_ffn": {b: torch.randperm(8, generator=g) for b in sparse},
        "ffn": {b: torch.randperm(24, generator=g) for b in dense},
    }
    new = apply_selection(model, sel)
    assert len(new.model.layers) == 5 and new.config.to_dict() == model.config.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(new(X).logits, model(X).logits, rtol=1e-4, atol=1e-5)
    for got, ref in zip(draft_logits(new), draft_logits(model), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in new.parameters()) == sum(p.numel() for p in model.parameters())  # MTP: buffers


@pytest.mark.parametrize("family", FAMILIES)
def test_selections_the_configs_hold_and_what_they_refuse(family):
    model = tiny(family)
    sparse = [1, 2, 3, 4]
    # shared experts keep n * the routed width: 8 shared neurons over 4 per expert -> two shared experts
    new = apply_selection(model, {"expert_ffn": {b: torch.arange(4) for b in sparse}})
    assert (new.config.moe_intermediate_size, new.config.n_shared_experts) == (4, 2)
    assert "shared_expert_intermediate_size" not in new.config.to_dict()
    with pytest.raises(ValueError, match=r"the 6 shared-expert neurons kept must be a multiple of the 4"):
        apply_selection(model, {"expert_ffn": {b: torch.arange(4) for b in sparse},
                                "shared_ffn": {b: torch.arange(6) for b in sparse}})  # fmt: skip
    # whole routing groups may go; a group kept keeps as many experts as the others
    new = apply_selection(model, {"expert": {b: torch.tensor([4, 5, 6, 7]) for b in sparse}})
    assert (new.config.n_routed_experts, new.config.n_group) == (4, 1)
    with pytest.raises(ValueError, match=r"do not keep the same number in each of the kept routing groups"):
        apply_selection(model, {"expert": {b: torch.tensor([0, 1, 2, 4]) for b in sparse}})
    with pytest.raises(ValueError, match=r"every group needs at least two experts"):
        apply_selection(model, {"expert": {b: torch.tensor([0, 4]) for b in sparse}})
    with pytest.raises(ValueError, match=r"num_experts_per_tok=3: routing reaches only topk_group \* experts per"):
        apply_selection(model, {"expert": {b: torch.tensor([0, 1, 4, 5]) for b in sparse}},
                        updates={"num_experts_per_tok": 3})  # fmt: skip
    # a layer selection lists the MTP layers after the kept decoder layers, or drops them
    new = select(model, "layer", [0, 2, 3])
    assert (new.config.num_hidden_layers, new.config.num_nextn_predict_layers, len(new.model.layers)) == (2, 1, 3)
    assert new.config.first_k_dense_replace == 1
    assert select(model, "layer", [0, 1]).config.num_nextn_predict_layers == 0
    with pytest.raises(ValueError, match=r"MTP layers \[4\] must follow the kept decoder layers in depth order"):
        select(model, "layer", [0, 1, 4])
    with pytest.raises(ValueError, match=r"kept dense layers must come before the kept sparse ones"):
        select(model, "layer", [1, 0])


# ---- calibration -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_calibration_equals_the_in_memory_pass(family, tmp_path):
    tiny(family).save_pretrained(tmp_path, max_shard_size=40_000)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert len(model.model.layers) == 3  # stock from_pretrained skips the MTP layers
    ref = collect_statistics(model, X, **KW)  # attaches them from the checkpoint for the pass
    assert len(model.model.layers) == 3
    got = collect_statistics(str(tmp_path), X, **KW)
    assert ref.metadata["blocks"][-2:] == ["model.layers.3", "model.layers.4"] and got.metadata == ref.metadata
    assert sorted(got.tensors) == sorted(ref.tensors)
    for key in ref.tensors:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
    assert (ref["expert.frequency"][-2:].sum(-1) > 0).all() and (ref["layer.block_influence"][-2:] > 0).all()


# ---- pruning: stock transformers drafts with the pruned MTP layers -----------------------------------------------
@pytest.fixture(scope="module")
def decodable(tmp_path_factory):
    """family -> (model loaded from a checkpoint at the decodable depth, its statistics, the folder)."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"src-{family}")
        tiny(family, layers=DECODABLE[family], mtp=1).save_pretrained(folder, max_shard_size=200_000)
        model = AutoModelForCausalLM.from_pretrained(folder)
        stats = collect_statistics(model, X[:2], num_samples=2, max_length=12, show_progress=False)
        out[family] = (model, stats, folder)
    return out


def _config(family: str) -> PruneConfig:
    kv = {"num_key_value_heads": 2} if family == "deepseek_v3" else {}  # MLA: every head its own key/value
    return PruneConfig(
        hidden_size=12, num_attention_heads=2, **kv, num_experts=4, moe_intermediate_size=4, intermediate_size=12,
        expert_strategy="merge", merge_similarity="router_weight",
    )


def test_pruned_checkpoints_draft_with_stock_transformers(decodable, tmp_path):
    expected, folders = {}, {}
    for family, (model, stats, src) in decodable.items():
        pc = _config(family)
        small = prune(model, pc, stats)
        assert len(model.model.layers) == DECODABLE[family]  # the source is left as it was
        c = small.config
        assert (c.num_nextn_predict_layers, c.n_group, c.n_shared_experts, c.hidden_size) == (1, 2, 1, 12)
        a = save_pruned(small, tmp_path / family / "a" / "pruned", prune_config=pc, before=size_summary(model),
                        base_model=src)  # the streamed card names its source folder
        b = prune_checkpoint(src, tmp_path / family / "b" / "pruned", pc, stats, show_progress=False)
        for name in sorted(p.name for p in a.iterdir()):
            if not name.endswith(".safetensors"):
                assert filecmp.cmp(a / name, b / name, shallow=False), name
        wa, wb = weights(a), weights(b)
        assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
        assert f"model.layers.{DECODABLE[family]}.eh_proj.weight" in wb
        expected[family] = draft_logits(small)[0]
        folders[family] = str(b)
    script = f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        from transformers.modeling_layers import MtpModel
        x = torch.tensor({X[:2].tolist()})
        out = {{}}
        for family, folder in {json.dumps(folders)}.items():
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            greedy = model.generate(x[:1], max_new_tokens=10, do_sample=False)
            mtp = model.generate(x[:1], max_new_tokens=10, do_sample=False, use_mtp=True)
            drafter = MtpModel.from_pretrained(model)  # raises when a weight is missing
            with torch.no_grad():
                hidden = model.model(x).last_hidden_state
                positions = torch.arange(1, x.shape[1]).unsqueeze(0)
                logits = model.lm_head(drafter.forward_layer(0, hidden[:, :-1], positions, None, input_ids=x[:, 1:]))
            out[family] = {{"same": torch.equal(greedy, mtp), "logits": logits.tolist()}}
        print(json.dumps(out))
    """
    result = run_without_hf_slim(script, env={"HF_HOME": str(tmp_path / "hf_home")})
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for family in FAMILIES:
        assert got[family]["same"], family
        torch.testing.assert_close(torch.tensor(got[family]["logits"]), expected[family], rtol=1e-4, atol=1e-5)


def test_depth_cuts_keep_mtp_decodable_or_say_why(decodable, tmp_path):
    model, stats, src = decodable["glm4_moe"]
    message = (
        r"num_hidden_layers=40: glm4_moe's MTP layers would move to model.layers.40, but transformers loads them only "
        r"from model.layers.46 or model.layers.92, so generate\(use_mtp=True\) would fail on the pruned model; keep "
        r"num_hidden_layers=46 \(widths and experts still prune\) or pass keep_mtp_decodable=False"
    )
    with pytest.raises(ValueError, match=message):
        prune(model, PruneConfig(num_hidden_layers=40), stats)
    with pytest.raises(ValueError, match=message):
        prune_checkpoint(src, tmp_path / "out", PruneConfig(num_hidden_layers=40), stats, show_progress=False)
    assert not (tmp_path / "out").exists()
    small = prune(model, PruneConfig(num_hidden_layers=40), stats, keep_mtp_decodable=False)
    c = small.config
    assert (c.num_hidden_layers, c.num_nextn_predict_layers, len(small.model.layers)) == (40, 1, 41)
    assert not mtp_weights_found(type(small), 40, ["model.layers.40.enorm.weight"])
    # where the source's MTP layers were not where transformers looks, a depth cut loses nothing: renumbered
    shallow = tiny("deepseek_v3", layers=3, mtp=2)
    cut = prune(shallow, PruneConfig(num_hidden_layers=2))
    assert (cut.config.num_hidden_layers, cut.config.num_nextn_predict_layers, len(cut.model.layers)) == (2, 2, 4)
    state = shallow.state_dict()
    assert torch.equal(cut.state_dict()["model.layers.2.eh_proj.weight"], state["model.layers.3.eh_proj.weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_refuses_what_the_routing_and_shared_experts_cannot_hold(family, decodable):
    model, stats, _ = decodable[family]
    with pytest.raises(ValueError, match=rf"num_experts=3: {family} routes within n_group=2 groups of experts"):
        prune(model, PruneConfig(num_experts=3), stats)
    with pytest.raises(ValueError, match=r"shared_expert_intermediate_size=4: .* prune them with moe_intermediate"):
        prune(model, PruneConfig(shared_expert_intermediate_size=4), stats)
    n = DECODABLE[family]
    bare = ImportanceStats(stats.tensors, {**stats.metadata, "blocks": stats.metadata["blocks"][:-1]})
    with pytest.raises(ValueError, match=rf"stats: collected over {n} blocks, the model holds {n + 1} \(MTP layers"):
        prune(model, PruneConfig(num_experts=4), bare)  # statistics of the model without its MTP layers


# ---- the stored layout -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_reader_and_writer_follow_save_pretrained(family, tmp_path):
    """Experts stored one tensor per expert (transformers' qwen2_moe conversion), MTP layers included."""
    model = tiny(family)
    folder = tmp_path / "saved"
    model.save_pretrained(folder, max_shard_size=40_000)
    state = model.state_dict()
    assert "model.layers.3.mlp.experts.0.gate_proj.weight" in weights(folder)
    with CheckpointReader(folder) as reader:
        assert sorted(reader.names()) == sorted(state)
        for name in reader.names():
            assert torch.equal(reader.read(name), state[name]), name
    out = tmp_path / "written"
    with ShardedCheckpointWriter(out, spec=get_spec(model), config=model.config, max_shard_size=40_000) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
    model.config.save_pretrained(out)
    stored, reference = weights(out), weights(folder)
    assert sorted(stored) == sorted(reference) and all(torch.equal(stored[k], reference[k]) for k in stored)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_mtp_rule_matches_transformers(family):
    """`mtp_weights_found` is `MtpModel.get_mtp_weights_regex`'s rule (a touch point of transformers internals)."""
    from transformers.modeling_layers import MtpModel

    for depth in (3, DECODABLE[family], DECODABLE[family] - 6):
        config = AutoConfig.for_model(family, **CONFIGS[family], num_hidden_layers=depth)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        try:
            regex = MtpModel.get_mtp_weights_regex(model)
            stock = regex.search(f"model.layers.{depth}.enorm.weight") is not None
        except ValueError:
            stock = False
        assert mtp_weights_found(type(model), depth, [f"model.layers.{depth}.enorm.weight"]) == stock
        assert stock == (depth == DECODABLE[family])
    for attr in ("forward_layer", "tie_with_main_model", "get_mtp_weights_regex"):
        assert callable(getattr(MtpModel, attr))
