import argparse
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3MoeForCausalLM

from hf_slim.elastic import ElasticBudget, ElasticConfig, make_elastic, slice_variant
from hf_slim.cli.slice import add_slice_parser
from hf_slim.hub import save_for_hub
from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM
from hf_slim.models.slim_moe import loading_slim_moe
from hf_slim.pruning import collect_statistics
from hf_slim.pruning.scores import hidden_importance


VARIANTS = {
    "small": {
        "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "num_experts": 3,
        "num_experts_per_tok": 1, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 0,
        "intermediate_size": 24,
    },
    "medium": {"hidden_size": 24, "num_experts": 4, "moe_intermediate_size": 12, "shared_expert_intermediate_size": 16},
}


def tiny_config(**overrides) -> SlimMoeConfig:
    fields = dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, mlp_layer_types=["sparse", "dense", "sparse"], num_mtp_heads=2,
    )
    fields.update(overrides)
    return SlimMoeConfig(**fields)


def _stats(model, seed=1):
    data = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(seed))
    return collect_statistics(model, data, num_samples=4, max_length=16, batch_size=4, show_progress=False)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    full = SlimMoeForCausalLM(tiny_config()).eval()
    elastic = make_elastic(full, ElasticConfig(variants=VARIANTS), _stats(full), layer_method="block_influence")
    return full, elastic


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


# ---- configuration -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variants, match",
    [
        ({"small": {"hidden": 16}}, r"'small'.*unknown field.*\['hidden'\]"),
        ({"small": {"hidden_size": 64}}, r"'small'.*hidden_size=64 .*full model's 32"),
        ({"small": {"num_attention_heads": 3}}, r"'small'.*num_attention_heads=3 breaks head divisibility.*\[2, 4\]"),
        ({"small": {"num_attention_heads": 2, "num_key_value_heads": 2}}, r"'small'.*num_key_value_heads must be 1"),
        ({"small": {"num_experts": 1}}, r"'small'.*num_experts_per_tok=2 .*num_experts=1"),
        ({"small": {"num_hidden_layers": [2, 0]}}, r"'small'.*num_hidden_layers=\[2, 0\]"),
        ({"full": {"hidden_size": 16}}, r"name 'full' is invalid"),
        (
            {"a": {"hidden_size": 16, "num_experts": 5}, "b": {"hidden_size": 24, "num_experts": 4}},
            r"variants 'a' and 'b' do not nest on axis num_experts",
        ),
        (
            {"a": {"num_hidden_layers": [0, 2]}, "b": {"num_hidden_layers": [0, 1]}},
            r"variants 'a' and 'b' do not nest on axis num_hidden_layers",
        ),
    ],
)
def test_invalid_variants_name_variant_and_axis(variants, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(elastic={"variants": variants})
    with pytest.raises(ValueError, match=match):
        ElasticConfig(variants=variants).validate(tiny_config())


def test_elastic_config_without_model_checks_nesting_and_divisibility():
    with pytest.raises(ValueError, match="do not nest on axis hidden_size"):
        ElasticConfig(variants={"a": {"hidden_size": 64, "num_experts": 4}, "b": {"hidden_size": 32, "num_experts": 8}})
    with pytest.raises(ValueError, match="head divisibility"):
        ElasticConfig(variants={"a": {"num_attention_heads": 6, "num_key_value_heads": 4}})
    with pytest.raises(ValueError, match="non-empty dict"):
        ElasticConfig(variants={})
    config = ElasticConfig(variants={"b": {"hidden_size": 32}, "a": {"hidden_size": 16, "num_experts": 4}})
    assert config.names == ["a", "b"]
    assert ElasticConfig.from_dict(config.to_dict()) == config


def test_elastic_stored_in_config_json(tmp_path):
    config = tiny_config(elastic=ElasticConfig(variants=VARIANTS).to_dict())
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["elastic"]
    assert stored == {"variants": VARIANTS}
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert ElasticConfig.from_model_config(loaded).variants == VARIANTS
    assert loaded.elastic_variant_names() == ["small", "medium", "full"]


def test_variant_config_sizes_and_nesting():
    config = tiny_config(elastic={"variants": {**VARIANTS, "small": {**VARIANTS["small"], "num_hidden_layers": [0, 2]}}})
    small = config.variant_config("small")
    assert (small.num_hidden_layers, small.hidden_size, small.num_attention_heads, small.num_key_value_heads) == (2, 16, 2, 1)
    assert (small.num_experts, small.num_experts_per_tok, small.moe_intermediate_size) == (3, 1, 8)
    assert small.shared_expert_intermediate_size == 0 and small.head_dim == 8
    assert small.mlp_layer_types == ["sparse", "sparse"] and small.elastic is None
    medium = config.variant_config("medium")
    assert (medium.hidden_size, medium.num_experts, medium.num_hidden_layers) == (24, 4, 3)
    # the medium config still carries small, renumbered against medium's own layers
    assert medium.elastic["variants"]["small"]["num_hidden_layers"] == [0, 2]
    assert medium.variant_config("small").to_dict() == small.to_dict()
    assert config.variant_config("full").elastic == config.elastic
    with pytest.raises(KeyError, match=r"'tiny'.*\['small', 'medium', 'full'\]"):
        config.variant_config("tiny")
    with pytest.raises(ValueError, match="no elastic variants"):
        tiny_config().variant_config("small")


# ---- importance ordering and slicing -------------------------------------------------------------------------------
def test_make_elastic_permutation_keeps_outputs_and_sorts_axes(pair, ids):
    full, elastic = pair
    with torch.no_grad():
        a, b = full(ids, labels=ids), elastic(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    for x, y in zip(a.mtp_logits, b.mtp_logits):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    assert elastic.config.elastic["variants"]["small"]["num_hidden_layers"] != 2  # resolved to indices by BI
    assert len(elastic.config.elastic["variants"]["small"]["num_hidden_layers"]) == 2
    # statistics of the ordered model on the same data are sorted: every prefix holds the most important units
    stats = _stats(elastic)
    hidden = hidden_importance(stats)
    assert torch.all(hidden[:-1] >= hidden[1:] - 1e-5)
    reap = stats["expert.reap"]
    assert torch.all(reap[:, :-1] >= reap[:, 1:] - 1e-6)
    assert elastic.config.to_dict()["hidden_size"] == full.config.hidden_size


def test_make_elastic_refuses_foreign_statistics(pair):
    full, _ = pair
    other = SlimMoeForCausalLM(tiny_config(hidden_size=16, num_attention_heads=2, num_key_value_heads=1)).eval()
    with pytest.raises(ValueError, match="hidden_size"):
        make_elastic(full, VARIANTS, _stats(other))


@pytest.mark.parametrize("name", ["small", "medium"])
def test_sliced_variant_equals_runtime_variant(pair, ids, name):
    _, elastic = pair
    by_anatomy = slice_variant(elastic, name).eval()
    by_model = elastic.slice_variant(name).eval()
    expected = elastic.config.variant_config(name).to_dict()
    assert by_anatomy.config.to_dict() == expected and by_model.config.to_dict() == expected
    with torch.no_grad():
        runtime = elastic(ids, labels=ids, elastic_variant=name)
        for sliced in (by_anatomy, by_model):
            out = sliced(ids, labels=ids)
            torch.testing.assert_close(out.logits, runtime.logits, atol=1e-5, rtol=1e-5)
            for x, y in zip(out.mtp_logits, runtime.mtp_logits):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    for key, value in by_anatomy.state_dict().items():
        torch.testing.assert_close(by_model.state_dict()[key], value, atol=0, rtol=0, msg=key)
    # a slice is elastic over what it contains: medium -> small == full -> small
    if name == "medium":
        with torch.no_grad():
            torch.testing.assert_close(
                by_model(ids, elastic_variant="small").logits, elastic(ids, elastic_variant="small").logits,
                atol=1e-5, rtol=1e-5,
            )
    # the same greedy continuation with the KV cache (cache layers renumbered over the kept layers)
    out_runtime = elastic.generate(ids, max_new_tokens=4, do_sample=False, elastic_variant=name, pad_token_id=0)
    assert torch.equal(by_model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), out_runtime)


def test_runtime_variant_uses_prefix_views_and_shares_gradients(pair, ids, monkeypatch):
    _, elastic = pair
    model = SlimMoeForCausalLM(elastic.config).train()
    model.load_state_dict(elastic.state_dict())
    storages = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}
    n_params = sum(p.numel() for p in model.parameters())
    seen = []
    linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        seen.append((weight.untyped_storage().data_ptr(), weight.numel()))
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    out = model(ids, labels=ids, elastic_variant="small")
    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    assert seen and all(ptr in storages for ptr, _ in seen)  # every weight is a view of a parameter
    assert sum(p.numel() for p in model.parameters()) == n_params
    out.loss.backward()
    embed = model.model.embed_tokens.weight.grad
    assert embed[:, :16].abs().sum() > 0 and torch.all(embed[:, 16:] == 0)
    kept = model.config.elastic_variant_sizes("small")["layers"]
    sparse = next(i for i in kept if model.config.mlp_layer_types[i] == "sparse")
    experts = model.model.layers[sparse].mlp.experts.gate_up_proj.grad
    dropped = next(i for i in range(3) if i not in kept)
    assert all(p.grad is None for p in model.model.layers[dropped].parameters())
    assert torch.all(experts[3:] == 0) and torch.all(experts[:, 8:16] == 0) and experts[:3, :8, :16].abs().sum() > 0
    small_grad = embed.clone()
    model(ids, labels=ids).loss.backward()  # joint training: the full model's gradient adds into the same tensors
    assert model.model.embed_tokens.weight.grad[:, 16:].abs().sum() > 0
    assert not torch.equal(model.model.embed_tokens.weight.grad[:, :16], small_grad[:, :16])


@pytest.mark.parametrize("name", ["small", "medium"])
def test_gradient_checkpointing_recomputes_the_same_variant(pair, ids, name):
    # The backward recompute runs after `elastic_variant` has exited; it must still use the variant's sizes.
    _, elastic = pair
    grads = []
    for checkpointing in (False, True):
        model = SlimMoeForCausalLM(elastic.config).train()
        model.load_state_dict(elastic.state_dict())
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.model.layers[0].gradient_checkpointing
        model(ids, labels=ids, elastic_variant=name).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert model.active_elastic_variant == "full"
        assert model.model._variant_plan is None  # nothing left switched on
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-6, rtol=1e-5, msg=key)


def test_elastic_variant_context_nests_and_errors(pair, ids):
    _, elastic = pair
    with torch.no_grad():
        expected = elastic(ids, elastic_variant="small").logits
        with elastic.elastic_variant("medium"):
            with elastic.elastic_variant("small"):
                assert elastic.active_elastic_variant == "small"
                torch.testing.assert_close(elastic(ids).logits, expected)
            assert elastic.active_elastic_variant == "medium"
        assert elastic.active_elastic_variant == "full"
        assert elastic(ids).logits.shape == expected.shape
    with pytest.raises(KeyError, match=r"'tiny'.*\['small', 'medium', 'full'\]"):
        elastic(ids, elastic_variant="tiny")
    assert elastic.active_elastic_variant == "full"
    plain = SlimMoeForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="no elastic variants"):
        plain(ids, elastic_variant="small")


# ---- partial loading -----------------------------------------------------------------------------------------------
class _ReadSpy:
    """Wraps the loader's file read and records every `(fd, offset, bytes)`; safetensors' mmap reader is refused."""

    def __init__(self):
        self.reads = []

    def __call__(self, fd, view, offset):
        count = _REAL_PREAD(fd, view, offset)
        self.reads.append((fd, offset, count))
        return count

    @staticmethod
    def refuse_safe_open(*args, **kwargs):
        raise AssertionError(f"safe_open (memory-mapped read) called with {args}")


_REAL_PREAD = loading_slim_moe._pread_into


def test_partial_loading_reads_only_the_variant(pair, ids, tmp_path, monkeypatch):
    _, elastic = pair
    elastic.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    spy = _ReadSpy()
    monkeypatch.setattr(loading_slim_moe, "_pread_into", spy)
    monkeypatch.setattr(loading_slim_moe, "safe_open", _ReadSpy.refuse_safe_open)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, elastic_variant="small")
    monkeypatch.undo()
    reference = elastic.slice_variant("small").eval()
    variant_elements = sum(t.numel() for t in reference.state_dict().values())
    # exactly the variant's bytes, each read once: no range read twice or overlapping another
    assert sum(count for _, _, count in spy.reads) == 4 * variant_elements
    by_file = {}
    for fd, offset, count in spy.reads:
        by_file.setdefault(fd, []).append((offset, count))
    for runs in by_file.values():
        runs.sort()
        assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(runs))
    report = loaded.elastic_load_report
    assert report["bytes_read"] == 4 * variant_elements < report["checkpoint_bytes"] / 2
    assert report["reads"] == len(spy.reads) < variant_elements
    loaded_config = {k: v for k, v in loaded.config.to_dict().items() if k != "_name_or_path"}
    assert loaded_config == {k: v for k, v in reference.config.to_dict().items() if k != "_name_or_path"}
    assert not loaded.training
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, elastic(ids, elastic_variant="small").logits, atol=1e-5, rtol=1e-5)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, elastic_variant="medium", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.config.hidden_size == 24
    with pytest.raises(TypeError, match="key_mapping"):  # what partial loading does not take (tests/test_partial_loading.py)
        AutoModelForCausalLM.from_pretrained(tmp_path, elastic_variant="small", key_mapping={"^old": "new"})


def test_tensor_runs_coalesce_contiguous_ranges():
    runs = loading_slim_moe._tensor_runs
    assert runs((4, 6), ([(0, 2)], [(0, 6)]), 4) == [(0, 48)]  # [:2, :] is one read
    assert runs((4, 6), ([(0, 4)], [(0, 3)]), 4) == [(0, 12), (24, 12), (48, 12), (72, 12)]  # [:, :3]: one per row
    assert runs((4, 6), ([(0, 4)], [(0, 6)]), 2) == [(0, 48)]
    # fused gate/up halves of dim 1, whole rows: one read per half per expert, adjacent halves coalesce
    assert runs((2, 8, 3), ([(0, 2)], [(0, 2), (4, 6)], [(0, 3)]), 1) == [(0, 6), (12, 6), (24, 6), (36, 6)]
    assert runs((2, 4, 3), ([(0, 1)], [(0, 2), (2, 4)], [(0, 3)]), 1) == [(0, 12)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_safetensors_ranges_equals_slicing(tmp_path, dtype):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(3, 8, 5, generator=g).to(dtype),
        "lm_head.weight": torch.randn(7, 6, generator=g).to(dtype),
        "norm": torch.randn(6, generator=g).to(dtype),
    }
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path)
    header, start = loading_slim_moe._safetensors_header(path)
    expected = {
        "model.layers.0.mlp.experts.gate_up_proj": (
            (2, 4, 3), torch.cat([tensors["model.layers.0.mlp.experts.gate_up_proj"][:2, a : a + 2, :3] for a in (0, 4)], 1)
        ),
        "lm_head.weight": ((5, 6), tensors["lm_head.weight"][:5]),
        "norm": ((4,), tensors["norm"][:4]),
    }
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, (shape, want) in expected.items():
            got, count, _ = loading_slim_moe._read_safetensors_ranges(path, header, start, name, shape, fd)
            assert got.dtype == dtype and count == want.numel() * want.element_size()
            assert torch.equal(got, want), name
    finally:
        os.close(fd)


def test_remote_code_elastic_loading_without_hf_slim(pair, ids, tmp_path):
    _, elastic = pair
    folder = save_for_hub(elastic, tmp_path / "export")
    with torch.no_grad():
        expected = elastic(ids, elastic_variant="small").logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_slim"] = None
        import torch
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True, elastic_variant="small")
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.testing.assert_close(model(ref["ids"]).logits, ref["logits"], atol=1e-5, rtol=1e-5)
        print("REMOTE_OK", model.config.hidden_size)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK 16" in result.stdout


# ---- budget-controlled generation ----------------------------------------------------------------------------------
def _greedy(model, tokens, variant, steps, stop=None):
    tokens = list(tokens)
    written = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([tokens]), elastic_variant=variant, use_cache=False).logits[0, -1].argmax())
            tokens.append(token)
            written.append(token)
            if token == stop:
                break
    return written


def test_budget_generation_equals_reference(pair):
    _, model = pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (6, 4, 5)]
    budget, answer_len = 5, 4
    # an end token the small variant emits naturally in one row (first at step 3), so both stop paths are exercised
    natural = next(b for b, p in enumerate(prompts) if (t := _greedy(model, p, "small", 3))[-1] not in t[:-1])
    end = _greedy(model, prompts[natural], "small", 3)[-1]
    width = max(map(len, prompts))
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    out = model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=answer_len, pad_token_id=0,
        elastic_budget=ElasticBudget("small", end_think_token_id=end, max_thinking_tokens=budget, answer_variant="full"),
        return_dict_in_generate=True,
    )
    for b, prompt in enumerate(prompts):
        thinking = _greedy(model, prompt, "small", budget, stop=end)
        forced = thinking[-1] != end
        context = prompt + thinking + ([end] if forced else [])
        answer = _greedy(model, context, "full", answer_len)
        expected = context + answer
        row = out.sequences[b].tolist()
        assert row[len(row) - len(expected) :] == expected
        assert all(t == 0 for t in row[: len(row) - len(expected)])
        assert int(out.thinking_tokens[b]) == len(thinking) and bool(out.forced_end[b]) == forced
        assert int(out.answer_tokens[b]) == answer_len
    assert not out.forced_end[natural] and out.thinking_tokens[natural] == 3 and out.forced_end.any()
    plain = model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=answer_len, pad_token_id=0,
        elastic_budget=ElasticBudget("small", end_think_token_id=end, max_thinking_tokens=budget),
    )
    assert torch.equal(plain, out.sequences)


def test_budget_generation_bad_input(pair):
    _, model = pair
    ids = torch.randint(0, 128, (1, 4))
    with pytest.raises(ValueError, match=r"end_think_token_id=500 is not in the vocabulary"):
        model.generate(ids, max_new_tokens=2, elastic_budget=ElasticBudget("small", end_think_token_id=500))
    with pytest.raises(KeyError, match=r"'tiny'"):
        model.generate(ids, max_new_tokens=2, elastic_budget=ElasticBudget("tiny", end_think_token_id=5))
    with pytest.raises(ValueError, match="max_thinking_tokens"):
        ElasticBudget("small", end_think_token_id=5, max_thinking_tokens=0)


# ---- command line --------------------------------------------------------------------------------------------------
def _run_cli(argv):
    parser = argparse.ArgumentParser(prog="hf-slim")
    add_slice_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_slice_cli_writes_a_standalone_variant(pair, ids, tmp_path):
    _, elastic = pair
    source = save_for_hub(elastic, tmp_path / "elastic")
    assert _run_cli(["slice", str(source), "medium", str(tmp_path / "medium")]) == 0
    sliced = AutoModelForCausalLM.from_pretrained(tmp_path / "medium").eval()
    assert sliced.config.hidden_size == 24 and "small" in sliced.config.elastic["variants"]
    with torch.no_grad():
        torch.testing.assert_close(sliced(ids).logits, elastic(ids, elastic_variant="medium").logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileExistsError):
        _run_cli(["slice", str(source), "small", str(tmp_path / "medium")])


def test_slice_cli_exports_stock_architecture(ids, tmp_path):
    config = tiny_config(shared_expert_intermediate_size=0, mlp_layer_types=None, num_mtp_heads=1)
    full = SlimMoeForCausalLM(config).eval()
    elastic = make_elastic(full, {"small": {"hidden_size": 16, "num_experts": 4, "moe_intermediate_size": 8}}, _stats(full))
    source = save_for_hub(elastic, tmp_path / "elastic")
    assert _run_cli(["slice", str(source), "small", str(tmp_path / "stock"), "--to", "qwen3_moe"]) == 0
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    assert isinstance(stock, Qwen3MoeForCausalLM) and stock.config.hidden_size == 16
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, elastic(ids, elastic_variant="small").logits, atol=1e-5, rtol=1e-5)


# ---- per-layer expert FFN widths -----------------------------------------------------------------------------------
# layer 1 is dense: its entry is unused and stored as the widest sparse width
PER_LAYER = {
    "tiny": {"num_hidden_layers": [0, 2], "hidden_size": 16, "num_experts": 4, "moe_intermediate_size": [8, 4]},
    "narrow": {"moe_intermediate_size": [12, 3, 8], "num_experts": 5},
}


@pytest.fixture(scope="module")
def per_layer_model():
    torch.manual_seed(1)
    full = SlimMoeForCausalLM(tiny_config()).eval()
    return make_elastic(full, ElasticConfig(variants=PER_LAYER), _stats(full))


def test_per_layer_widths_resolve_and_nest(per_layer_model):
    config = per_layer_model.config
    assert config.elastic_variant_sizes("narrow")["moe_intermediate_size"] == [12, 12, 8]
    assert config.elastic_variant_sizes("tiny")["moe_intermediate_size"] == [8, 4]
    narrow = config.variant_config("narrow")
    assert narrow.moe_intermediate_size == [12, 12, 8] and narrow.expert_intermediate_size(3) == 12  # MTP: widest
    assert narrow.variant_config("tiny").to_dict() == config.variant_config("tiny").to_dict()
    # uniform widths over the sparse layers are stored as one int
    same = ElasticConfig(variants={"v": {"moe_intermediate_size": [8, 2, 8]}}).validate(config)
    assert same["v"]["moe_intermediate_size"] == 8


@pytest.mark.parametrize(
    "variants, match",
    [
        ({"v": {"moe_intermediate_size": [8, 8]}}, r"'v'.*moe_intermediate_size has 2 entries .*keeps 3 layers"),
        ({"v": {"num_hidden_layers": 2, "moe_intermediate_size": [8, 8, 8]}}, r"'v'.*has 3 entries .*keeps 2"),
        ({"v": {"moe_intermediate_size": [8, 8, 17]}}, r"'v'.*moe_intermediate_size\[2\]=17 \(layer 2\).*full model's 16"),
        ({"v": {"moe_intermediate_size": [8, 8, 0]}}, r"'v'.*moe_intermediate_size\[2\]=0"),
        ({"v": {"moe_intermediate_size": [8, "8", 8]}}, r"'v'.*moe_intermediate_size=.*list of integers"),
        (
            {"a": {"moe_intermediate_size": [8, 8, 4]}, "b": {"moe_intermediate_size": [4, 8, 8]}},
            r"'a' and 'b' do not nest on axis moe_intermediate_size \(layer \d\)",
        ),
    ],
)
def test_per_layer_widths_bad_input(variants, match):
    with pytest.raises(ValueError, match=match):
        ElasticConfig(variants=variants).validate(tiny_config())


def test_config_per_layer_expert_width_validation():
    config = tiny_config(moe_intermediate_size=[16, 4, 8])
    model = SlimMoeForCausalLM(config)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (6, 32, 32)
    assert model.model.layers[2].mlp.experts.down_proj.shape == (6, 32, 8)
    assert model.mtp.layers[0].mlp.experts.down_proj.shape == (6, 32, 16)  # widest sparse layer
    with pytest.raises(ValueError, match=r"moe_intermediate_size has 2 entries but num_hidden_layers is 3"):
        tiny_config(moe_intermediate_size=[16, 8])
    with pytest.raises(ValueError, match=r"moe_intermediate_size entries must be positive integers, got \[0\]"):
        tiny_config(moe_intermediate_size=[16, 0, 8])


@pytest.mark.parametrize("name", ["tiny", "narrow"])
def test_per_layer_widths_runtime_equals_sliced_and_loaded(per_layer_model, ids, tmp_path, name):
    elastic = per_layer_model
    by_anatomy = slice_variant(elastic, name).eval()
    by_model = elastic.slice_variant(name).eval()
    expected = elastic.config.variant_config(name).to_dict()
    assert by_anatomy.config.to_dict() == expected and by_model.config.to_dict() == expected
    widths = elastic.config.variant_config(name)
    for j, layer in enumerate(by_model.model.layers):
        if widths.mlp_layer_types[j] == "sparse":
            assert layer.mlp.experts.down_proj.shape[-1] == widths.expert_intermediate_size(j)
    elastic.save_pretrained(tmp_path / "nested")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nested", elastic_variant=name)
    assert loaded.elastic_load_report["bytes_read"] == 4 * sum(t.numel() for t in by_model.state_dict().values())
    by_model.save_pretrained(tmp_path / "standalone")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "standalone").eval()
    with torch.no_grad():
        runtime = elastic(ids, labels=ids, elastic_variant=name)
        for model in (by_anatomy, by_model, loaded, reloaded):
            out = model(ids, labels=ids)
            torch.testing.assert_close(out.logits, runtime.logits, atol=1e-5, rtol=1e-5)
            assert len(out.mtp_logits) == 2
            for x, y in zip(out.mtp_logits, runtime.mtp_logits, strict=True):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        # a variant narrower than the full model: the per-layer widths matter
        assert not torch.allclose(runtime.logits, elastic(ids).logits, atol=1e-3)
    for key, value in by_anatomy.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_anatomy_per_layer_sizes_only_where_the_config_holds_them():
    from transformers import Qwen3MoeConfig

    from hf_slim.anatomy import select

    slim = SlimMoeForCausalLM(tiny_config(num_mtp_heads=0)).eval()
    cut = select(slim, "expert_ffn", {0: torch.arange(10), 2: torch.arange(4)})
    assert cut.config.moe_intermediate_size == [10, 10, 4]
    assert cut.model.layers[2].mlp.experts.gate_up_proj.shape == (6, 8, 32)
    # MTP blocks take the widest decoder width: a selection that leaves them wider is refused
    with pytest.raises(ValueError, match=r"mtp.layers.0 keeps 16 .* give mtp.layers.0 10 indices"):
        select(SlimMoeForCausalLM(tiny_config()), "expert_ffn", {0: torch.arange(10), 2: torch.arange(4)})
    stock = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
    ))
    with pytest.raises(ValueError, match="same number in every layer"):
        select(stock, "expert_ffn", {0: torch.arange(6), 1: torch.arange(4)})


def test_slice_cli_per_layer_widths(per_layer_model, ids, tmp_path):
    source = save_for_hub(per_layer_model, tmp_path / "elastic")
    with pytest.raises(ValueError, match=r"model_type='qwen3_moe': variant 'narrow' has per-layer moe_intermediate_size"):
        _run_cli(["slice", str(source), "narrow", str(tmp_path / "stock"), "--to", "qwen3_moe"])
    assert _run_cli(["slice", str(source), "narrow", str(tmp_path / "narrow")]) == 0
    sliced = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow", trust_remote_code=True).eval()
    assert sliced.config.moe_intermediate_size == [12, 12, 8]
    with torch.no_grad():
        torch.testing.assert_close(
            sliced(ids).logits, per_layer_model(ids, elastic_variant="narrow").logits, atol=1e-5, rtol=1e-5
        )


def test_calibrate_and_nest_a_model_with_per_layer_expert_widths(ids):
    # A model whose config already holds per-layer expert widths (e.g. a sliced variant) can be calibrated, pruned
    # and nested again: the expert_ffn statistic is stored at the widest width and each layer uses its own prefix.
    torch.manual_seed(0)
    model = SlimMoeForCausalLM(tiny_config(moe_intermediate_size=[16, 16, 8])).eval()
    widths = [layer.mlp.experts.gate_up_proj.shape[1] // 2 for layer in model.model.layers
              if hasattr(layer.mlp, "experts")]
    assert sorted(set(widths)) == [8, 16]
    stats = _stats(model)
    act = stats["expert_ffn.act"]
    assert act.shape[-1] == 16
    narrow = [i for i, layer in enumerate(model.model.layers)
              if hasattr(layer.mlp, "experts") and layer.mlp.experts.gate_up_proj.shape[1] == 16]
    assert narrow and all(torch.all(act[i, :, 8:] == 0) and act[i, :, :8].sum() > 0 for i in narrow)
    nested = make_elastic(model, ElasticConfig(variants={"small": {"hidden_size": 16, "num_experts": 3}}), stats)
    with torch.no_grad():
        torch.testing.assert_close(nested(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        small = slice_variant(nested, "small")
        torch.testing.assert_close(small(ids).logits, nested(ids, elastic_variant="small").logits, atol=1e-5, rtol=1e-5)


def test_family_slicer_two_part_tensors_agree_with_the_anatomy_spec():
    # The shipped loading code cannot import anatomy, so it keeps its own list of tensors whose dim 1 holds an axis
    # twice; it must be exactly the slim_moe spec's `parts=2` rules on dim 1, or partial loading and slicing diverge.
    from hf_slim.anatomy import get_spec
    from hf_slim.models.slim_moe import loading_slim_moe

    spec = get_spec(tiny_config())
    rules = spec.global_rules + spec.block_rules + spec.config_rules(tiny_config(qk_norm="full"))
    two_part = {rule.pattern.replace("\\", "") for rule in rules if any(d.dim == 1 and d.parts == 2 for d in rule.dims)}
    assert two_part == {"mlp.experts.gate_up_proj", "eh_proj.weight"}
    assert all(any(name.endswith(suffix) for suffix in loading_slim_moe._TWO_PART_DIM1) for name in two_part)
    assert all(any(name.endswith(suffix) for name in two_part) for suffix in loading_slim_moe._TWO_PART_DIM1)
