"""Partial elastic loading (`from_pretrained(checkpoint, elastic_variant=...)`) takes transformers' loading arguments:
`dtype`, `device_map` (accelerate), `low_cpu_mem_usage` and `quantization_config` act as on the sliced variant's own
checkpoint. The tokenizer of an exported folder loads without the custom-code prompt."""

import builtins

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_slim.data import stdlib_corpus, train_tokenizer
from hf_slim.hub import run_without_hf_slim, save_for_hub
from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM


VARIANTS = {
    "small": {
        "num_hidden_layers": [0, 2], "hidden_size": 16, "num_attention_heads": 2, "num_experts": 3,
        "num_experts_per_tok": 1, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 0,
        "intermediate_size": 24,
    },
}  # fmt: skip


def _model(**overrides) -> SlimMoeForCausalLM:
    fields = dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, mlp_layer_types=["sparse", "dense", "sparse"], num_mtp_heads=1,
        elastic={"variants": VARIANTS},
    )  # fmt: skip
    fields.update(overrides)
    torch.manual_seed(0)
    return SlimMoeForCausalLM(SlimMoeConfig(**fields)).eval()


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nested")
    model = _model()
    model.save_pretrained(folder, max_shard_size="50KB")
    return folder, model


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def _assert_same_tensors(loaded, expected):
    got, want = loaded.state_dict(), expected.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key].cpu(), value.cpu()), key


@pytest.mark.parametrize(
    "kwargs",
    [
        {"device_map": "cpu"},
        {"device_map": "auto", "low_cpu_mem_usage": True},
        {"device_map": {"": "cpu"}},
        {"device_map": {"model": "cpu", "lm_head": "cpu", "mtp": "cpu"}, "max_memory": {"cpu": "1GB"}},
        {"low_cpu_mem_usage": True},
    ],
    ids=["cpu", "auto", "all", "per_module", "low_cpu_mem_usage"],
)
def test_device_map_loads_the_sliced_variant(nested, ids, kwargs):
    folder, model = nested
    loaded = AutoModelForCausalLM.from_pretrained(folder, elastic_variant="small", **kwargs)
    sliced = model.slice_variant("small").eval()
    _assert_same_tensors(loaded, sliced)
    assert loaded.elastic_load_report["bytes_read"] == sum(t.nbytes for t in sliced.state_dict().values())
    assert loaded.config.num_hidden_layers == 2 and not loaded.training
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.equal(logits, sliced(ids).logits)
        torch.testing.assert_close(logits, model(ids, elastic_variant="small").logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router_scoring", ["softmax", "sigmoid"])
def test_dtype_acts_as_on_a_full_load(tmp_path, ids, router_scoring):
    model = _model(router_scoring=router_scoring)
    model.save_pretrained(tmp_path)
    full = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, elastic_variant="small", dtype="bfloat16")
    expected = full.slice_variant("small").eval()
    _assert_same_tensors(loaded, expected)  # sigmoid routers stay in float32, as a full load keeps them
    router = loaded.model.layers[0].mlp.gate.weight.dtype
    assert loaded.dtype == torch.bfloat16
    assert router == (torch.float32 if router_scoring == "sigmoid" else torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)


def test_stored_dtype_is_kept_without_dtype(tmp_path):
    _model().to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, elastic_variant="small")
    assert loaded.dtype == AutoModelForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_config_equals_quantizing_the_sliced_folder(nested, ids, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    folder, model = nested
    quantization = BitsAndBytesConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4)
    model.slice_variant("small").save_pretrained(tmp_path)
    expected = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization)
    loaded = AutoModelForCausalLM.from_pretrained(folder, elastic_variant="small", quantization_config=quantization)
    projection = loaded.model.layers[0].self_attn.q_proj
    assert type(projection) is type(expected.model.layers[0].self_attn.q_proj)
    assert type(projection).__module__.startswith("bitsandbytes")
    _assert_same_tensors(loaded, expected)
    if bits == 8:  # bitsandbytes' CPU 4-bit matmul needs widths far above these tiny ones
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected(ids).logits)


def test_arguments_it_does_not_take_are_refused(nested):
    with pytest.raises(TypeError, match=r"does not take \['key_mapping'\]; it takes config, dtype, .*device_map"):
        AutoModelForCausalLM.from_pretrained(nested[0], elastic_variant="small", key_mapping={"^old": "new"})


# ---- exported folders: the tokenizer, and partial loading through the shipped code ---------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory, nested):
    tokenizer = train_tokenizer(stdlib_corpus(max_documents=20), vocab_size=300)
    return save_for_hub(nested[1], tmp_path_factory.mktemp("export") / "export", processing_class=tokenizer)


def test_tokenizer_loads_without_the_prompt_where_hf_slim_is_imported(exported, monkeypatch):
    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *args: prompts.append(args) or "n")
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert not prompts and tokenizer("def f(): pass")["input_ids"]


def test_shipped_code_loads_tokenizer_and_variant_with_loading_arguments(exported, ids, tmp_path):
    kwargs = dict(elastic_variant="small", dtype=torch.bfloat16, device_map="auto", low_cpu_mem_usage=True)
    reference = AutoModelForCausalLM.from_pretrained(exported, **kwargs)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": reference(ids).logits}, tmp_path / "ref.pt")
    result = run_without_hf_slim(
        f"""
        import builtins
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        def refuse(*args):
            raise AssertionError("prompted: " + str(args))

        builtins.input = refuse
        folder = {str(exported)!r}
        for trust in (True, False):  # AutoTokenizer reads config.json's auto_map: say whether to trust it
            assert AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)("def f(): pass")["input_ids"]
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        model = AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=True, elastic_variant="small", dtype=torch.bfloat16, device_map="auto",
            low_cpu_mem_usage=True,
        )
        assert type(model).__module__.startswith("transformers_modules") and model.dtype == torch.bfloat16
        with torch.no_grad():
            assert torch.equal(model(ref["ids"]).logits, ref["logits"])
        print("REMOTE_OK")
        """,
        env={"OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK" in result.stdout and "Do you wish to run the custom code" not in result.stdout
