"""Axes specs + generic select: identity, permutation invariance, pruning shapes, config follow-up, lazy slicing."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from hf_slim.anatomy import (
    apply_selection,
    contiguous_runs,
    get_spec,
    kv_indices_for_heads,
    normalize_selection,
    read_indexed,
    renamed,
    select,
    select_tensors,
    supported_model_types,
    tensor_index,
)
from hf_slim.models.slim_moe import loading_slim_moe
from hf_slim.models.slim_moe.loading_slim_moe import SafetensorsFile

# ---- tiny in-test models and real calibration text (shared with test_pruning / test_calibration) ----
VOCAB = 160

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

FAMILY_KWARGS: dict[str, dict] = {
    "qwen3_moe": dict(
        _COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=2,
    ),
    "qwen2_moe": dict(
        _COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
        num_experts_per_tok=2, qkv_bias=True, mlp_only_layers=[1],
    ),
    "olmoe": dict(
        _COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2, attention_bias=False,
    ),
    "mixtral": dict(_COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "qwen3_next": dict(
        _COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
        num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, mlp_only_layers=[2],
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    ),
    "slim_moe": dict(
        _COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
        num_experts_per_tok=2, qk_norm="head", num_mtp_heads=1, attention_output_bias=True,
        mlp_layer_types=["sparse", "dense", "sparse", "sparse"],
    ),
    "glm4_moe": dict(
        _COMMON, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=3, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
    ),
    "slim_moe_full_qk_norm": dict(
        _COMMON, model_type="slim_moe", moe_intermediate_size=16, shared_expert_intermediate_size=0, num_experts=8,
        num_experts_per_tok=2, qk_norm="full", num_mtp_heads=2, attention_bias=True, tie_word_embeddings=True,
    ),
}
FAMILIES = sorted(FAMILY_KWARGS)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Default init leaves routers at zero and norms at one, which hides mistakes; spread everything out."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")) or "conv1d" in name:
                continue
            if p.ndim == 1:
                base = 0.0 if name.endswith("norm.weight") and model.config.model_type == "qwen3_next" else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def tiny_model(family: str, seed: int = 0, **overrides):
    import hf_slim  # noqa: F401  (registers slim_moe with the Auto classes)

    kwargs = dict(FAMILY_KWARGS[family], **overrides)
    config = AutoConfig.for_model(kwargs.pop("model_type", family), **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _randomize(model, seed)
    model.eval()
    return model


def real_text() -> list[str]:
    """Paragraphs of real English/Python text from the standard library (present on every machine)."""
    sources = [inspect.getsource(json), inspect.getsource(textwrap), inspect.getsource(inspect)]
    paras = []
    for src in sources:
        paras += [p.strip() for p in src.split("\n\n") if len(p.strip()) > 80]
    return paras


def byte_ids(text: str, vocab: int = VOCAB) -> list[int]:
    return [b % vocab for b in text.encode("utf-8")]


def token_batch(n: int = 4, length: int = 32, offset: int = 0) -> torch.Tensor:
    ids = byte_ids(" ".join(real_text()))[offset:]
    return torch.tensor(ids[: n * length]).view(n, length)


X = token_batch(2, 24)


def logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


def _blocks(model, test):
    """Decoder layers by number, then MTP layers by prefix, that pass `test`."""
    spec = get_spec(model)
    out = []
    for block in spec.blocks(model):
        if test(model.get_submodule(block)):
            out.append(int(block.rsplit(".", 1)[1]) if spec.is_decoder_block(block) else block)
    return out


def sparse_layers(model):
    return _blocks(model, lambda layer: hasattr(layer.mlp, "experts"))


def dense_layers(model):
    return _blocks(model, lambda layer: hasattr(layer.mlp, "down_proj"))


def attn_layers(model):
    return _blocks(model, lambda layer: hasattr(layer, "self_attn"))


def group_perm(n_heads: int, n_kv: int, g: torch.Generator) -> torch.Tensor:
    """A KV-group aware permutation: shuffle the groups and the heads inside each group."""
    size = n_heads // n_kv
    groups = torch.randperm(n_kv, generator=g).tolist()
    return torch.cat([torch.randperm(size, generator=g) + size * k for k in groups])


@pytest.mark.parametrize("family", FAMILIES)
def test_full_index_set_is_identity(family):
    model = tiny_model(family)
    c = model.config
    sel = {
        "hidden": torch.arange(c.hidden_size),
        "layer": torch.arange(c.num_hidden_layers),
        "head": {i: torch.arange(c.num_attention_heads) for i in attn_layers(model)},
        "expert": {i: torch.arange(8) for i in sparse_layers(model)},
    }
    out = apply_selection(model, sel)
    assert type(out) is type(model)
    ref = logits(model)
    assert ref.std() > 0.1  # the tiny model must produce informative logits for the test to mean anything
    torch.testing.assert_close(logits(out), ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_permutations_keep_the_function(family):
    model = tiny_model(family, seed=1)
    c = model.config
    g = torch.Generator().manual_seed(0)
    ffn_width = model.model.layers[sparse_layers(model)[0]].mlp.experts.down_proj.shape[-1]
    sel = {
        "hidden": torch.randperm(c.hidden_size, generator=g),
        "head": {i: group_perm(c.num_attention_heads, c.num_key_value_heads, g) for i in attn_layers(model)},
        "expert": {i: torch.randperm(8, generator=g) for i in sparse_layers(model)},
        # one neuron order per expert (2-D) on half the layers, a shared order (1-D) on the rest
        "expert_ffn": {
            i: (torch.stack([torch.randperm(ffn_width, generator=g) for _ in range(8)]) if k % 2 else
                torch.randperm(ffn_width, generator=g))
            for k, i in enumerate(sparse_layers(model))
        },
    }
    dl = dense_layers(model)
    if dl:
        width = model.model.layers[dl[0]].mlp.down_proj.weight.shape[1]
        sel["ffn"] = {i: torch.randperm(width, generator=g) for i in dl}
    if hasattr(model.model.layers[sparse_layers(model)[0]].mlp, "shared_expert"):
        width = c.shared_expert_intermediate_size
        sel["shared_ffn"] = {i: torch.randperm(width, generator=g) for i in sparse_layers(model)}
    out = apply_selection(model, sel)
    torch.testing.assert_close(logits(out), logits(model), rtol=1e-5, atol=1e-5)
    # the permutation really moved weights (guards against a no-op select)
    assert not torch.equal(out.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_shapes_config_and_stock_reload(family, tmp_path):
    model = tiny_model(family, seed=2)
    c = model.config
    keep_layers = torch.tensor([0, 1, 3])
    spec = get_spec(model)
    sel = {
        "layer": keep_layers,
        "expert": {i: torch.tensor([5, 1, 2, 7]) for i in sparse_layers(model)},
        "head": {i: torch.tensor([2, 3]) for i in attn_layers(model)},  # drops KV group 0
    }
    if family == "olmoe":  # OLMoE sizes q_norm by hidden_size: shrink both together
        sel["hidden"] = torch.arange(16)
    else:
        sel["hidden"] = torch.arange(0, 32, 2)
    out = apply_selection(model, sel)
    n = out.config
    assert n.num_hidden_layers == 3 and n.hidden_size == 16
    assert getattr(n, spec.field("num_experts")) == 4
    assert n.num_attention_heads == 2 and n.num_key_value_heads == 1 and n.head_dim == 8
    # the kept weights are exactly the selected slices of the source
    src = model.model.layers[3].mlp if 3 in sparse_layers(model) else None
    if src is not None:
        torch.testing.assert_close(out.model.layers[2].mlp.gate.weight, src.gate.weight[[5, 1, 2, 7]][:, sel["hidden"]])
    if hasattr(n, "layer_types") and c.layer_types is not None:
        assert n.layer_types == [c.layer_types[i] for i in keep_layers.tolist()]
    # dense/sparse layout survives dropped layers
    assert [hasattr(out.model.layers[j].mlp, "experts") for j in range(3)] == [
        hasattr(model.model.layers[i].mlp, "experts") for i in keep_layers.tolist()
    ]
    ids = out(X[:, :8]).logits
    assert ids.shape == (2, 8, c.vocab_size)
    out.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back) is type(model)
    torch.testing.assert_close(logits(back.eval()), logits(out), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_slices_without_a_model(family, tmp_path):
    """The spec alone (names, shapes, config) gives each tensor's slice; prefixes read from safetensors lazily."""
    model = tiny_model(family, seed=3)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}  # tied weights saved apart
    save_file(state, str(tmp_path / "m.safetensors"))
    spec = get_spec(model.config.model_type)  # a string is enough: no model instance needed
    sl = sparse_layers(model)
    sel = {
        "expert": {i: torch.arange(6) for i in sl},
        "expert_ffn": {i: torch.arange(12) for i in sl},
        "layer": torch.tensor([0, 1, 2]),
    }
    if family != "olmoe":  # OLMoE needs hidden == heads * head_dim; the other families take any prefix
        sel["hidden"] = torch.arange(24)
    sel = normalize_selection(spec, sel)
    ref, _ = select_tensors(spec, model.config, state, sel)
    with SafetensorsFile(tmp_path / "m.safetensors") as f:
        got = {}
        for name in f.keys():
            idx = tensor_index(spec, name, f.shape(name), model.config, sel)
            if idx is None:
                continue
            got[name] = read_indexed(f, name, idx)
    assert "model.layers.3.input_layernorm.weight" not in got
    for name, t in got.items():
        torch.testing.assert_close(t, ref[name], rtol=0, atol=0)


def test_contiguous_runs():
    assert contiguous_runs(torch.tensor([0, 1, 2, 5, 6, 3])) == [(0, 3), (5, 7), (3, 4)]


@pytest.mark.parametrize("family", ["slim_moe", "qwen3_moe"])
def test_lazy_read_of_a_non_prefix_selection_maps_nothing(family, tmp_path, monkeypatch):
    """Out-of-order experts, scattered hidden dims and per-expert (2-D) neuron sets, read by byte ranges, equal the
    in-memory selection bit for bit; safetensors' memory-mapped reader is never called."""
    model = tiny_model(family, seed=5)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"))
    spec = get_spec(model.config.model_type)
    sl = sparse_layers(model)
    g = torch.Generator().manual_seed(0)
    n_experts, ffn = model.config.num_experts, model.config.moe_intermediate_size
    sel = normalize_selection(spec, {
        "expert": {i: torch.tensor([5, 1, 3]) for i in sl},
        "expert_ffn": {i: torch.stack([torch.randperm(ffn, generator=g)[:6] for _ in range(n_experts)]) for i in sl},
        "hidden": torch.tensor([0, 2, 3, 7]),
        "layer": torch.tensor([2, 0, 1]),
    })
    ref, _ = select_tensors(spec, model.config, state, sel)

    def refuse(*args, **kwargs):
        raise AssertionError("safe_open (memory-mapped read) called")

    monkeypatch.setattr(loading_slim_moe, "safe_open", refuse)
    monkeypatch.setattr("safetensors.safe_open", refuse)
    with SafetensorsFile(tmp_path / "m.safetensors") as f:
        got = {}
        for name in f.keys():
            idx = tensor_index(spec, name, f.shape(name), model.config, sel)
            if idx is not None:
                got[renamed(spec, name, sel)] = t = read_indexed(f, name, idx)
                assert torch.equal(read_indexed(state[name], None, idx), t), name  # an in-memory tensor source
        read = f.bytes_read
    assert sorted(got) == sorted(ref) and read < sum(t.nbytes for t in state.values())
    for name, t in got.items():
        assert t.dtype == ref[name].dtype and torch.equal(t, ref[name]), name


def test_kv_group_rules():
    assert kv_indices_for_heads(torch.tensor([6, 7, 2, 3]), 8, 4).tolist() == [3, 1]
    assert kv_indices_for_heads(torch.tensor([0, 2, 4, 6]), 8, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="grouped by KV head"):
        kv_indices_for_heads(torch.tensor([0, 2, 1, 3]), 8, 4)
    with pytest.raises(ValueError, match="uneven"):
        kv_indices_for_heads(torch.tensor([0, 1, 2]), 8, 4)


def test_select_single_axis_and_layer_keyword():
    model = tiny_model("mixtral")
    out = select(model, "expert", torch.arange(8).flip(0), layer=range(4))
    torch.testing.assert_close(logits(out), logits(model), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same number in every layer"):
        select(model, "expert", {0: [0, 1, 2], 1: [0, 1, 2, 3]})
    with pytest.raises(ValueError, match="num_experts_per_tok=2"):
        select(model, "expert", [3], layer=range(4))
    with pytest.raises(ValueError, match="valid axes"):
        select(model, "vocab", [0])


def test_olmoe_hidden_must_match_heads():
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="hidden_size=16"):
        select(model, "hidden", torch.arange(16))


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ValueError) as err:
        get_spec("llama")
    for mt in supported_model_types():
        assert mt in str(err.value)


@pytest.mark.parametrize("family", ["slim_moe", "qwen3_next", "mixtral"])
def test_variant_by_sizes_from_a_checkpoint_alone(family, tmp_path):
    """Elastic use: sizes -> prefix selection -> new config + lazily read slices, with no source model instance;
    the result equals `apply_selection` on the model."""
    from hf_slim.anatomy import prefix_selection, select_config

    model = tiny_model(family, seed=4)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"))
    sizes = {"num_hidden_layers": 3, "num_experts": 4, "moe_intermediate_size": 8, "num_attention_heads": 2}
    if family != "mixtral":
        sizes["hidden_size"] = 24
    spec = get_spec(model.config.model_type)
    with SafetensorsFile(tmp_path / "m.safetensors") as f:
        names = f.keys()
        sel = normalize_selection(spec, prefix_selection(spec, model.config, sizes, names))
        new_config = select_config(spec, model.config, sel)
        tensors = {}
        for name in names:
            idx = tensor_index(spec, name, f.shape(name), model.config, sel)
            if idx is not None:
                tensors[renamed(spec, name, sel)] = read_indexed(f, name, idx)
    assert new_config.num_key_value_heads == 2  # every KV head kept, one query head per group
    variant = AutoModelForCausalLM.from_config(new_config).eval()
    variant.load_state_dict(tensors, strict=True)
    reference = apply_selection(model, prefix_selection(spec, model.config, sizes, names))
    torch.testing.assert_close(logits(variant), logits(reference), rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_experts=9"):
        prefix_selection(spec, model.config, {"num_experts": 9})


def test_remote_code_size_fields_agree_with_the_vocabulary():
    """The SlimMoe family files ship as remote code and keep their own copy of the size vocabulary."""
    from hf_slim.anatomy import NESTED_SIZE_FIELDS, SIZE_FIELDS
    from hf_slim.models.slim_moe import variants_slim_moe

    assert set(variants_slim_moe.ELASTIC_FIELDS) == set(SIZE_FIELDS)
    assert set(variants_slim_moe.ELASTIC_NESTED_FIELDS) == set(NESTED_SIZE_FIELDS)
    assert variants_slim_moe.ELASTIC_FIELDS[0] == "num_hidden_layers"  # the variant code treats layers first


def test_one_vocabulary_for_every_size_list():
    from hf_slim.anatomy import (
        AXES,
        AXIS_SIZE_FIELDS,
        PER_LAYER_SIZE_FIELD_OF_AXIS,
        SIZE_FIELD_OF_AXIS,
        SIZES,
    )
    from hf_slim.pruning import SIZE_FIELDS, PruneConfig

    assert SIZE_FIELDS == tuple(f.name for f in SIZES)
    assert set(SIZE_FIELD_OF_AXIS) == set(AXES)  # every axis has exactly one size field
    assert set(PER_LAYER_SIZE_FIELD_OF_AXIS) == {"head", "expert", "expert_ffn", "shared_ffn", "ffn"}
    assert set(AXIS_SIZE_FIELDS) == set(SIZE_FIELDS) - {"num_experts_per_tok"}
    assert set(SIZE_FIELDS) <= {f for f in PruneConfig.__dataclass_fields__}


def test_layers_with_moved_to_anatomy_keeps_a_deprecated_alias():
    from hf_slim import anatomy

    with pytest.warns(FutureWarning, match="hf_slim.anatomy.layers_with"):
        from hf_slim.pruning.prune import layers_with
    assert layers_with is anatomy.layers_with


def test_register_family_refuses_a_clash():
    from hf_slim.anatomy import register_family

    with pytest.raises(ValueError, match="qwen3_moe"):
        register_family("qwen3_moe", "somewhere.else")
