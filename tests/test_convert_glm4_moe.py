"""GLM-4-MoE (GLM-4.5 / GLM-4.5-Air) <-> SlimMoe, lossless both ways, in memory and on disk: sigmoid routing with a
score-correction bias inside expert groups, routed scaling, ungated shared experts, partial rotary, attention biases,
q/k norms and dense first layers are SlimMoe fields; the MTP layers stay in GLM's own layout (`model.layers.{N + k}`)
on the stock side, where stock `generate(use_mtp=True)` drafts with them at depth 46; DeepSeek-V3 is refused in one
sentence. Plus what SlimMoe's new fields mean for old checkpoints, pruning and elastic variants."""

from __future__ import annotations

import filecmp
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, Glm4MoeForCausalLM

from hf_slim import convert_checkpoint
from hf_slim.anatomy import apply_selection
from hf_slim.anatomy.mtp_blocks import attach_mtp_layers
from hf_slim.convert import from_hf, to_hf
from hf_slim.elastic import ElasticConfig, make_elastic, slice_variant
from hf_slim.hub import run_without_hf_slim, save_for_hub
from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM
from hf_slim.pruning import collect_statistics

VOCAB = 64
#: every GLM-4-MoE feature at once: 4 routing groups (2 per token), routed scaling, 2 shared experts, a dense first
#: layer, q/k/v biases, per-head q/k norms, partial rotary (GLM's default 0.5: 4 of 8 channels)
GLM = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=8, n_routed_experts=8,
    num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, norm_topk_prob=True, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    attention_bias=True, use_qk_norm=True, max_position_embeddings=64, tie_word_embeddings=False,
)  # fmt: skip
#: GLM-4.5-Air's depth, where transformers looks for the MTP layer; tiny otherwise
TINY_46 = dict(
    vocab_size=VOCAB, hidden_size=16, intermediate_size=16, moe_intermediate_size=4, n_routed_experts=4,
    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
    routed_scaling_factor=2.0, num_attention_heads=2, num_key_value_heads=1, head_dim=8, attention_bias=True,
    max_position_embeddings=64, num_hidden_layers=46,
)  # fmt: skip
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
PROMPT = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))


def glm(layers: int = 3, mtp: int = 0, seed: int = 0, base: dict = GLM, **overrides) -> Glm4MoeForCausalLM:
    """A random GLM-4-MoE (norms off one, a correction bias that changes the routing), with `mtp` MTP layers attached
    after its decoder layers in GLM-4.5's layout (their `embed_tokens` / `shared_head.head` copies of the model's)."""
    config = AutoConfig.for_model(
        "glm4_moe", **{**base, "num_hidden_layers": layers, "num_nextn_predict_layers": mtp, **overrides}
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    leaves = ("enorm.weight", "embed_tokens.weight", "shared_head.head.weight")
    for block in attach_mtp_layers(model, [f"model.layers.{layers + k}.{leaf}" for k in range(mtp) for leaf in leaves]):
        model.get_submodule(block).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        state = model.state_dict()
        for name, t in state.items():
            if name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif t.ndim == 1:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5)
        for k in range(mtp):
            state[f"model.layers.{layers + k}.embed_tokens.weight"].copy_(state["model.embed_tokens.weight"])
            state[f"model.layers.{layers + k}.shared_head.head.weight"].copy_(state["lm_head.weight"])
    return model.eval()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return out


def same_weights(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def logits(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


# ---- in memory -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"use_qk_norm": False, "norm_topk_prob": False, "first_k_dense_replace": 0}])
def test_stock_glm_converts_with_its_logits_and_back_to_its_state_dict(overrides):
    stock = glm(**overrides)
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0  # left padding
    slim = from_hf(stock)
    c = slim.config
    assert (c.router_scoring, c.n_group, c.topk_group, c.routed_scaling_factor) == ("sigmoid", 4, 2, 2.5)
    assert (c.shared_expert_intermediate_size, c.shared_expert_gated, c.rope_parameters["partial_rotary_factor"]) == (
        16, False, 0.5
    )
    dense = stock.config.first_k_dense_replace
    assert c.attention_bias and c.mlp_layer_types == ["dense"] * dense + ["sparse"] * (3 - dense)
    assert c.qk_norm == ("head" if stock.config.use_qk_norm else None)
    torch.testing.assert_close(logits(slim, attention_mask=mask), logits(stock, attention_mask=mask), atol=1e-5, rtol=0)
    # the correction bias takes part: without it other experts are chosen
    bias = slim.model.layers[2].mlp.gate.e_score_correction_bias
    saved = bias.clone()
    with torch.no_grad():
        bias.zero_()
        assert not torch.allclose(logits(slim), logits(stock), atol=1e-3)
        bias.copy_(saved)
    # cached greedy decoding: the same tokens
    assert torch.equal(
        slim.generate(PROMPT, max_new_tokens=8, do_sample=False), stock.generate(PROMPT, max_new_tokens=8, do_sample=False)
    )
    back = to_hf(slim, "glm4_moe")
    assert type(back) is Glm4MoeForCausalLM and back.config.to_dict() == stock.config.to_dict()
    assert same_weights(back.state_dict(), stock.state_dict())


def test_half_precision_keeps_the_float32_router_bitwise(tmp_path):
    glm().save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert stock.model.layers[1].mlp.gate.weight.dtype == torch.float32  # transformers keeps it in float32
    slim = from_hf(stock)
    gate = slim.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert slim.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    torch.testing.assert_close(logits(slim), logits(stock), atol=0, rtol=0)
    assert same_weights(to_hf(slim, "glm4_moe").state_dict(), stock.state_dict())
    slim.save_pretrained(tmp_path / "slim")
    reloaded = SlimMoeForCausalLM.from_pretrained(tmp_path / "slim", dtype=torch.bfloat16).eval()
    assert reloaded.model.layers[1].mlp.gate.weight.dtype == torch.float32
    torch.testing.assert_close(logits(reloaded), logits(stock), atol=0, rtol=0)


# ---- on disk ---------------------------------------------------------------------------------------------------
def test_checkpoint_conversion_both_ways_equals_the_in_memory_one(tmp_path):
    stock = glm()
    stock.save_pretrained(tmp_path / "glm", max_shard_size=40_000)
    slim_folder = convert_checkpoint(tmp_path / "glm", tmp_path / "slim", show_progress=False)
    loaded = SlimMoeForCausalLM.from_pretrained(slim_folder).eval()
    assert same_weights(weights(slim_folder), from_hf(stock).state_dict())
    torch.testing.assert_close(logits(loaded), logits(stock), atol=1e-5, rtol=0)
    back = convert_checkpoint(slim_folder, tmp_path / "d" / "back", to="glm4_moe", show_progress=False)
    assert same_weights(weights(back), weights(tmp_path / "glm"))
    assert not (back / "mtp.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(reloaded) is Glm4MoeForCausalLM
    assert json.loads((back / "config.json").read_text()) == json.loads((tmp_path / "glm" / "config.json").read_text())
    torch.testing.assert_close(logits(reloaded), logits(stock), atol=0, rtol=0)
    # the in-memory export writes the same folder
    in_memory = save_for_hub(loaded, tmp_path / "c" / "back", model_type="glm4_moe",
                             card_kwargs={"base_model": slim_folder, "base_model_relation": "convert"})
    for name in sorted(p.name for p in in_memory.iterdir()):
        if not name.endswith(".safetensors"):
            assert filecmp.cmp(in_memory / name, back / name, shallow=False), name
    assert same_weights(weights(in_memory), weights(back))


# ---- MTP -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def glm_46(tmp_path_factory):
    """A 46-layer GLM-4-MoE with one MTP layer (GLM-4.5-Air's layout), saved by stock `save_pretrained`, and its
    SlimMoe conversion on disk."""
    root = tmp_path_factory.mktemp("glm46")
    model = glm(mtp=1, base=TINY_46, layers=46)
    model.save_pretrained(root / "glm", max_shard_size=60_000)
    assert "model.layers.46.shared_head.head.weight" in weights(root / "glm")
    slim = convert_checkpoint(root / "glm", root / "slim", show_progress=False)
    return model, root / "glm", slim


def test_glm_mtp_layers_become_slim_moe_heads_that_draft(glm_46):
    model, folder, slim_folder = glm_46
    assert json.loads((slim_folder / "config.json").read_text())["num_mtp_heads"] == 1
    streamed = weights(slim_folder)
    assert not any(name.startswith("model.layers.46.") for name in streamed)
    post_norm = model.state_dict()["model.layers.46.shared_head.norm.weight"]
    assert torch.equal(streamed["mtp.layers.0.post_norm.weight"], post_norm)
    assert same_weights(streamed, from_hf(model).state_dict())  # in memory: the attached MTP layer, the same heads
    # a GLM-4-MoE pruned by hf-slim keeps its MTP layer attached, and converts with it
    from hf_slim.pruning import PruneConfig, prune

    stats = collect_statistics(model, IDS[:1], num_samples=1, max_length=11, show_progress=False)
    pruned = prune(model, PruneConfig(hidden_size=12), stats)
    carried = from_hf(pruned)
    assert carried.config.num_mtp_heads == 1 and carried.config.hidden_size == 12
    assert torch.equal(carried.mtp.layers[0].eh_proj.weight, pruned.state_dict()["model.layers.46.eh_proj.weight"])
    from transformers.modeling_layers import MtpModel

    stock = AutoModelForCausalLM.from_pretrained(folder).eval()
    slim = SlimMoeForCausalLM.from_pretrained(slim_folder).eval()
    x = IDS[:1]
    with torch.no_grad():
        drafter = MtpModel.from_pretrained(stock)
        hidden = stock.model(x).last_hidden_state
        positions = torch.arange(1, x.shape[1]).unsqueeze(0)
        expected = stock.lm_head(drafter.forward_layer(0, hidden[:, :-1], positions, None, input_ids=x[:, 1:]))
        out = slim(x, return_mtp=True, return_mtp_logits=True)
    torch.testing.assert_close(out.logits, logits(stock, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mtp_logits[0], expected, atol=1e-5, rtol=0)
    plain = slim.generate(PROMPT, max_new_tokens=10, do_sample=False)
    drafted = slim.generate(PROMPT, max_new_tokens=10, do_sample=False, use_mtp=True)
    assert torch.equal(drafted, plain) and sum(slim.mtp_stats.drafted) > 0
    assert torch.equal(plain, stock.generate(PROMPT, max_new_tokens=10, do_sample=False))


def test_slim_moe_exports_its_mtp_heads_in_glm_layout_that_stock_transformers_drafts_with(glm_46, tmp_path):
    """SlimMoe (46 layers, 1 MTP head) -> glm4_moe, in memory and tensor by tensor: the stock source's own files back,
    and stock transformers without hf_slim drafts with the MTP layer; the SlimMoe folder's remote code runs there too."""
    _, folder, slim_folder = glm_46
    slim = SlimMoeForCausalLM.from_pretrained(slim_folder).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # depth 46: transformers finds the layer, nothing to warn about
        a = save_for_hub(slim, tmp_path / "a", model_type="glm4_moe")
        b = convert_checkpoint(slim_folder, tmp_path / "b", to="glm4_moe", show_progress=False)
    assert same_weights(weights(a), weights(folder)) and same_weights(weights(b), weights(folder))
    card = (b / "README.md").read_text()
    assert "`model.layers.46`" in card and "Stock transformers drafts with them" in card
    remote = save_for_hub(slim, tmp_path / "remote")  # SlimMoe with its modeling code
    with torch.no_grad():
        out = slim(IDS[:1], return_mtp=True, return_mtp_logits=True)
    plain = slim.generate(PROMPT, max_new_tokens=10, do_sample=False)
    script = f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        from transformers.modeling_layers import MtpModel
        x, prompt = torch.tensor({IDS[:1].tolist()}), torch.tensor({PROMPT.tolist()})
        model = AutoModelForCausalLM.from_pretrained({str(b)!r}).eval()
        greedy = model.generate(prompt, max_new_tokens=10, do_sample=False)
        mtp = model.generate(prompt, max_new_tokens=10, do_sample=False, use_mtp=True)
        drafter = MtpModel.from_pretrained(model)  # raises when a weight is missing
        with torch.no_grad():
            hidden = model.model(x).last_hidden_state
            positions = torch.arange(1, x.shape[1]).unsqueeze(0)
            mtp_logits = model.lm_head(drafter.forward_layer(0, hidden[:, :-1], positions, None, input_ids=x[:, 1:]))
        remote = AutoModelForCausalLM.from_pretrained({str(remote)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            remote_logits = remote(x).logits
        remote_mtp = remote.generate(prompt, max_new_tokens=10, do_sample=False, use_mtp=True)
        print(json.dumps({{"class": type(model).__name__, "greedy": greedy.tolist(), "mtp": mtp.tolist(),
                           "mtp_logits": mtp_logits.tolist(), "remote": type(remote).__module__,
                           "remote_logits": remote_logits.tolist(), "remote_mtp": remote_mtp.tolist()}}))
    """
    # one thread: the tiny model gains nothing from more, and a shared machine's load slows a spinning pool down
    result = run_without_hf_slim(script, env={"HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["class"] == "Glm4MoeForCausalLM" and got["greedy"] == got["mtp"] == plain.tolist()
    torch.testing.assert_close(torch.tensor(got["mtp_logits"]), out.mtp_logits[0], atol=1e-5, rtol=0)
    assert got["remote"].startswith("transformers_modules") and got["remote_mtp"] == plain.tolist()
    torch.testing.assert_close(torch.tensor(got["remote_logits"]), out.logits, atol=1e-5, rtol=0)


def test_mtp_layers_at_a_depth_transformers_does_not_read_warn_and_round_trip(tmp_path):
    model = glm(mtp=2)  # 3 decoder layers: MTP layers 3 and 4
    slim = from_hf(model)
    assert slim.config.num_mtp_heads == 2
    message = r"model.layers.3, but transformers loads glm4_moe's MTP layers only from model.layers.46 or model.layers.92"
    with pytest.warns(UserWarning, match=message):
        folder = save_for_hub(slim, tmp_path / "glm", model_type="glm4_moe")
    assert "does not find these" in (folder / "README.md").read_text()
    assert "model.layers.4.eh_proj.weight" in weights(folder)
    with pytest.warns(UserWarning, match=message):
        assert same_weights(to_hf(slim, "glm4_moe").state_dict(), model.state_dict())
    back = convert_checkpoint(folder, tmp_path / "slim", show_progress=False)
    assert same_weights(weights(back), slim.state_dict())
    bare = to_hf(slim, "glm4_moe", keep_mtp=False)  # no warning, no MTP layer
    assert bare.config.num_nextn_predict_layers == 0 and len(bare.model.layers) == 3
    with pytest.raises(ValueError, match=r"num_mtp_heads=1, but the model holds 2 MTP layer\(s\)"):
        from_hf(model, num_mtp_heads=1)


# ---- bad input -------------------------------------------------------------------------------------------------
def _slim(**overrides) -> SlimMoeForCausalLM:
    fields = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8,
        shared_expert_gated=False, router_scoring="sigmoid", qk_norm=None, mlp_layer_types=["dense", "sparse"],
        intermediate_size=24,
    )  # fmt: skip
    return SlimMoeForCausalLM(SlimMoeConfig(**{**fields, **overrides}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shared_expert_gated": True}, r"config.shared_expert_gated=True but glm4_moe supports only \(False,\)"),
        ({"router_scoring": "softmax"}, r"config.router_scoring='softmax' but glm4_moe supports only \('sigmoid',\)"),
        ({"shared_expert_intermediate_size": 12}, r"config.shared_expert_intermediate_size=12 but GLM-4-MoE sizes"),
        ({"shared_expert_intermediate_size": 0}, r"config.shared_expert_intermediate_size=0 but GLM-4-MoE sizes"),
        ({"mlp_layer_types": ["sparse", "dense"]}, r"config.mlp_layer_types has dense layers \[1\] but GLM-4-MoE"),
        ({"qk_norm": "full"}, r"config.qk_norm='full' but glm4_moe supports only \(None, 'head'\)"),
        ({"sliding_window": 8}, r"config.layer_types has 'sliding_attention' layers"),
        ({"num_mtp_heads": 2, "mtp_shared_norm": True}, r"config.mtp_shared_norm=True"),
    ],
)
def test_what_glm4_moe_cannot_hold_is_one_sentence(overrides, message, tmp_path):
    model = _slim(**overrides)
    with pytest.raises(ValueError, match=message):
        to_hf(model, "glm4_moe")
    model.save_pretrained(tmp_path / "slim")
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(tmp_path / "slim", tmp_path / "out", to="glm4_moe", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_deepseek_v3_is_refused_naming_multi_head_latent_attention(tmp_path):
    config = AutoConfig.for_model(
        "deepseek_v3", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=4, intermediate_size=8, n_group=1,
        topk_group=1,
    )  # fmt: skip
    message = r"^deepseek_v3 does not convert to or from SlimMoe: SlimMoe has no multi-head latent attention .*q_lora_rank"
    with pytest.raises(ValueError, match=message):
        from_hf(AutoModelForCausalLM.from_config(config))
    with pytest.raises(ValueError, match=message):
        to_hf(_slim(), "deepseek_v3")
    config.save_pretrained(tmp_path / "ds")
    for kwargs in ({}, {"to": "deepseek_v3"}):
        source = tmp_path / "ds" if not kwargs else tmp_path / "slim"
        if kwargs:
            _slim().save_pretrained(source)
        with pytest.raises(ValueError, match=message):
            convert_checkpoint(source, tmp_path / "out", show_progress=False, **kwargs)


def test_router_fields_are_checked_in_one_sentence():
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_experts=8,
                num_experts_per_tok=2)  # fmt: skip
    cases = [
        ({"router_scoring": "tanh"}, r"router_scoring must be one of \('softmax', 'sigmoid'\), got 'tanh'"),
        ({"n_group": 2}, r"n_group=2, topk_group=1: group-limited routing is part of router_scoring='sigmoid'"),
        ({"router_scoring": "sigmoid", "n_group": 3}, r"n_group=3: .* num_experts=8 must split into n_group groups"),
        ({"router_scoring": "sigmoid", "n_group": 2, "topk_group": 3}, r"topk_group=3 is larger than n_group=2"),
        ({"router_scoring": "sigmoid", "n_group": 4, "num_experts_per_tok": 3}, r"num_experts_per_tok=3: a token reach"),
        ({"routed_scaling_factor": 0}, r"routed_scaling_factor must be a number > 0, got 0"),
        ({"partial_rotary_factor": 1.5}, r"partial_rotary_factor'\] must be in \(0, 1\], got 1.5"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            SlimMoeConfig(**{**base, **overrides})
    SlimMoeConfig(**base, partial_rotary_factor=0.25)  # 2 channels: even, fine
    with pytest.raises(ValueError, match=r"rotates int\(head_dim \* factor\) = 3 channels of head_dim=12"):
        SlimMoeConfig(**{**base, "hidden_size": 48}, partial_rotary_factor=0.25)


# ---- SlimMoe: old checkpoints, pruning, elastic ----------------------------------------------------------------
NEW_FIELDS = ("router_scoring", "n_group", "topk_group", "routed_scaling_factor", "shared_expert_gated")


def test_old_checkpoints_without_the_new_fields_load_as_before(tmp_path):
    config = SlimMoeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_experts=4,
                           num_experts_per_tok=2, shared_expert_intermediate_size=8)  # fmt: skip
    model = SlimMoeForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    written = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in written.items() if k not in NEW_FIELDS}))  # an old config.json
    old = SlimMoeForCausalLM.from_pretrained(tmp_path).eval()
    c = old.config
    assert (c.router_scoring, c.n_group, c.topk_group, c.routed_scaling_factor, c.shared_expert_gated) == (
        "softmax", 1, 1, 1.0, True
    )
    assert "partial_rotary_factor" not in c.rope_parameters
    assert sorted(old.state_dict()) == sorted(model.state_dict())
    assert "model.layers.0.mlp.shared_expert_gate.weight" in old.state_dict()
    assert not any("e_score_correction_bias" in name for name in old.state_dict())
    torch.testing.assert_close(logits(old), logits(model), atol=0, rtol=0)


def _group_permutation(num_experts: int, groups: int, g: torch.Generator) -> torch.Tensor:
    size = num_experts // groups
    return torch.cat([k * size + torch.randperm(size, generator=g) for k in torch.randperm(groups, generator=g).tolist()])


def test_pruning_axes_carry_the_correction_bias_and_the_ungated_shared_expert():
    slim = from_hf(glm(mtp=1))
    c = slim.config
    g = torch.Generator().manual_seed(1)
    sparse = [1, 2, "mtp.layers.0"]
    selection = {
        "hidden": torch.randperm(c.hidden_size, generator=g),
        "expert": {b: _group_permutation(8, 4, g) for b in sparse},
        "shared_ffn": {b: torch.randperm(16, generator=g) for b in sparse},
    }
    new = apply_selection(slim, selection)
    assert new.config.to_dict() == c.to_dict()
    with torch.no_grad():
        want, got = slim(IDS, return_mtp=True, return_mtp_logits=True), new(IDS, return_mtp=True, return_mtp_logits=True)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.mtp_logits[0], want.mtp_logits[0], atol=1e-5, rtol=1e-4)
    # whole groups may go (n_group follows); groups may not be mixed
    kept = apply_selection(slim, {"expert": {b: torch.tensor([2, 3, 6, 7]) for b in sparse}})
    assert (kept.config.num_experts, kept.config.n_group, kept.config.topk_group) == (4, 2, 2)
    with pytest.raises(ValueError, match=r"do not keep the same number in each of the kept routing groups"):
        apply_selection(slim, {"expert": {b: torch.tensor([0, 2, 1, 3]) for b in sparse}})


def test_elastic_variants_under_grouped_routing(tmp_path):
    slim = from_hf(glm(mtp=1))
    stats = collect_statistics(slim, IDS, num_samples=2, max_length=11, show_progress=False)
    variants = {"small": {"hidden_size": 16, "shared_expert_intermediate_size": 8}}
    elastic = make_elastic(slim, ElasticConfig(variants=variants), stats)
    torch.testing.assert_close(logits(elastic), logits(slim), atol=1e-5, rtol=1e-4)  # experts permuted group-wise
    small = slice_variant(elastic, "small")
    torch.testing.assert_close(logits(small), logits(elastic, elastic_variant="small"), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"num_experts=4 cannot be a variant of a model that routes within n_group=4"):
        make_elastic(slim, ElasticConfig(variants={"few": {"num_experts": 4}}), stats)
    # a variant written tensor by tensor as GLM-4-MoE loads with stock transformers and computes as the variant
    from hf_slim import slice_checkpoint

    folder = save_for_hub(elastic, tmp_path / "elastic")
    with pytest.warns(UserWarning, match=r"written at model.layers.3, but transformers loads"):
        stock_small = slice_checkpoint(folder, "small", tmp_path / "small", model_type="glm4_moe", show_progress=False)
    stock = AutoModelForCausalLM.from_pretrained(stock_small).eval()
    assert type(stock) is Glm4MoeForCausalLM and stock.config.hidden_size == 16
    torch.testing.assert_close(logits(stock), logits(small), atol=1e-5, rtol=1e-4)
    sliced = weights(stock_small)  # the variant's MTP head in GLM's layout
    assert torch.equal(sliced["model.layers.3.eh_proj.weight"], small.state_dict()["mtp.layers.0.eh_proj.weight"])
    assert torch.equal(sliced["model.layers.3.shared_head.head.weight"], small.state_dict()["lm_head.weight"])
    # one group: expert variants are prefixes of the router, its correction bias included
    flat = from_hf(glm(n_group=1, topk_group=1))
    flat_stats = collect_statistics(flat, IDS, num_samples=2, max_length=11, show_progress=False)
    few = make_elastic(flat, ElasticConfig(variants={"few": {"num_experts": 4, "num_experts_per_tok": 2}}), flat_stats)
    cut = slice_variant(few, "few")
    assert cut.model.layers[1].mlp.gate.e_score_correction_bias.shape == (4,)
    torch.testing.assert_close(logits(cut), logits(few, elastic_variant="few"), atol=1e-5, rtol=1e-4)


def test_pruned_slim_moe_keeps_groups_and_exports_to_glm4_moe():
    from hf_slim.pruning import PruneConfig, prune

    slim = from_hf(glm(n_group=2, topk_group=1))
    stats = collect_statistics(slim, IDS, num_samples=2, max_length=11, show_progress=False)
    small = prune(slim, PruneConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4), stats)
    c = small.config
    assert (c.num_experts, c.n_group, c.moe_intermediate_size, c.shared_expert_intermediate_size) == (4, 2, 4, 16)
    kept = small.model.layers[1].mlp.gate.e_score_correction_bias
    assert kept.shape == (4,) and set(kept.tolist()) <= set(slim.model.layers[1].mlp.gate.e_score_correction_bias.tolist())
    stock = to_hf(small, "glm4_moe")
    assert (stock.config.n_routed_experts, stock.config.n_group, stock.config.n_shared_experts) == (4, 2, 4)
    torch.testing.assert_close(logits(stock), logits(small), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"num_experts_per_tok=3: a token reaches only topk_group \* experts per group"):
        prune(slim, PruneConfig(num_experts=4), stats)
