"""make_elastic_checkpoint and slice_checkpoint (tensor by tensor from disk) write exactly what the in-memory path
writes: save_for_hub(make_elastic(model, variants, stats)) and save_for_hub(SlimMoeForCausalLM.from_pretrained(source,
elastic_variant=v), model_type=...): same files, config, card and weights (bitwise)."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from test_convert import CASES  # noqa: E402
from test_elastic import PER_LAYER, VARIANTS, _stats, tiny_config  # noqa: E402
from test_streaming_convert import same_folders, weights  # noqa: E402

from hf_slim import convert_streaming, make_elastic_checkpoint, slice_checkpoint  # noqa: E402
from hf_slim.anatomy import normalize_selection  # noqa: E402
from hf_slim.checkpoints import open_checkpoint  # noqa: E402
from hf_slim.cli import main  # noqa: E402
from hf_slim.elastic import ElasticConfig, make_elastic  # noqa: E402
from hf_slim.hub import save_for_hub  # noqa: E402
from hf_slim.models.slim_moe import SlimMoeForCausalLM  # noqa: E402

SHARD = 60_000  # the tiny sources are saved in several shards
CARD = {"description": "A variant."}


def sliced_card(src: Path) -> dict:
    """CARD with what slice_checkpoint adds by default: its source as `base_model`, sliced."""
    return {**CARD, "base_model": src, "base_model_relation": "slice"}
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """(model, statistics, its folder in shards)."""
    torch.manual_seed(0)
    model = SlimMoeForCausalLM(tiny_config()).eval()
    return model, _stats(model), save_for_hub(model, tmp_path_factory.mktemp("full") / "full", max_shard_size=SHARD)


@pytest.fixture(scope="module")
def elastic(full, tmp_path_factory):
    """(nested model, its folder in shards): VARIANTS with block-influence layers; `small` drops the shared expert."""
    model, stats, _ = full
    nested = make_elastic(model, ElasticConfig(variants=VARIANTS), stats, layer_method="block_influence")
    return nested, save_for_hub(nested, tmp_path_factory.mktemp("elastic") / "elastic", max_shard_size=SHARD)


@pytest.fixture(scope="module")
def per_layer(tmp_path_factory):
    torch.manual_seed(1)
    model = SlimMoeForCausalLM(tiny_config()).eval()
    nested = make_elastic(model, ElasticConfig(variants=PER_LAYER), _stats(model))
    return nested, save_for_hub(nested, tmp_path_factory.mktemp("per_layer") / "per_layer")


def logits(model, variant=None):
    with torch.no_grad():
        return model(IDS, elastic_variant=variant).logits if variant else model(IDS).logits


# ---- make_elastic_checkpoint ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_method, chunk", [("last", None), ("block_influence", None), ("last", 1)])
def test_make_elastic_checkpoint_equals_make_elastic_saved_for_hub(full, layer_method, chunk, tmp_path, monkeypatch):
    model, stats, src = full
    if chunk is not None:  # every tensor read one row (one expert) at a time, as a large checkpoint's are
        monkeypatch.setattr(convert_streaming.read_bounded, "__defaults__", (chunk,))
    nested = make_elastic(model, VARIANTS, stats, layer_method=layer_method, expert_method="frequency")
    made = {"base_model": src, "base_model_relation": "elastic"}  # what make_elastic_checkpoint's card says by default
    a = save_for_hub(nested, tmp_path / "a" / "elastic", card_kwargs=made)
    b = make_elastic_checkpoint(
        src, tmp_path / "b" / "elastic", VARIANTS, stats, layer_method=layer_method, expert_method="frequency",
        show_progress=False,
    )
    same_folders(a, b)
    assert json.loads((b / "config.json").read_text())["elastic"] == nested.config.elastic


def test_read_bounded_reads_chunk_by_chunk_what_read_indexed_reads(full):
    """Row chunks of a permuted fused experts tensor (experts, one neuron order per expert, hidden channels) and of a
    hidden-permuted embedding hold the same values as one read_indexed of the whole selection."""
    from hf_slim.anatomy import read_indexed, tensor_index
    from hf_slim.checkpoints import StateDictReader
    from hf_slim.elastic import importance_orders

    model, stats, _ = full
    reader = StateDictReader(model.state_dict(), model.config)
    sel = normalize_selection(reader.spec, importance_orders(model, stats))
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj",
                 "model.embed_tokens.weight", "mtp.layers.0.eh_proj.weight"):
        index = tensor_index(reader.spec, name, reader.shape(name), model.config, sel)
        whole = read_indexed(reader, name, index)
        for chunk in (1, 3 * whole[0].numel() * whole.element_size() - 1):
            assert torch.equal(convert_streaming.read_bounded(reader, name, index, chunk_bytes=chunk), whole), name


def test_make_elastic_checkpoint_in_shards_keeps_the_function(full, tmp_path):
    model, stats, src = full
    out = make_elastic_checkpoint(src, tmp_path / "elastic", VARIANTS, stats, max_shard_size=SHARD, show_progress=False)
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    nested = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(nested), logits(model), atol=1e-5, rtol=1e-5)  # a permutation
    reference = make_elastic(model, VARIANTS, stats)
    torch.testing.assert_close(logits(nested, "small"), logits(reference, "small"), atol=1e-5, rtol=1e-5)


# ---- slice_checkpoint -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["small", "medium", "full"])
def test_slice_checkpoint_equals_the_loaded_variant_saved_for_hub(elastic, variant, tmp_path):
    _, src = elastic
    loaded = SlimMoeForCausalLM.from_pretrained(src, elastic_variant=variant)
    a = save_for_hub(loaded, tmp_path / "a" / variant, card_kwargs=sliced_card(src))
    b = slice_checkpoint(src, variant, tmp_path / "b" / variant, card_kwargs=CARD, show_progress=False)
    same_folders(a, b)
    if variant == "small":  # the variant drops the shared expert and one decoder layer
        assert not any("shared_expert" in key for key in weights(b))
        config = json.loads((b / "config.json").read_text())
        assert config["shared_expert_intermediate_size"] == 0 and config["num_hidden_layers"] == 2


@pytest.mark.parametrize("keep_mtp", [True, False])
def test_slice_to_a_stock_family(elastic, keep_mtp, tmp_path):
    nested, src = elastic
    loaded = SlimMoeForCausalLM.from_pretrained(src, elastic_variant="small")
    a = save_for_hub(
        loaded, tmp_path / "a" / "stock", model_type="qwen3_moe", keep_mtp=keep_mtp, card_kwargs=sliced_card(src)
    )
    b = slice_checkpoint(
        src, "small", tmp_path / "b" / "stock", model_type="qwen3_moe", keep_mtp=keep_mtp, card_kwargs=CARD,
        show_progress=False,
    )
    same_folders(a, b)
    assert (b / "mtp.safetensors").exists() == keep_mtp
    stock = AutoModelForCausalLM.from_pretrained(b).eval()
    assert isinstance(stock, Qwen3MoeForCausalLM) and stock.config.hidden_size == 16
    torch.testing.assert_close(logits(stock), logits(nested, "small"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["tiny", "narrow"])
def test_slice_per_layer_expert_widths(per_layer, variant, tmp_path):
    nested, src = per_layer
    loaded = SlimMoeForCausalLM.from_pretrained(src, elastic_variant=variant)
    a = save_for_hub(loaded, tmp_path / "a" / variant, card_kwargs=sliced_card(src))
    b = slice_checkpoint(src, variant, tmp_path / "b" / variant, card_kwargs=CARD, show_progress=False)
    same_folders(a, b)
    config = json.loads((b / "config.json").read_text())
    assert config["moe_intermediate_size"] == nested.config.variant_config(variant).moe_intermediate_size
    assert isinstance(config["moe_intermediate_size"], list)
    sliced = AutoModelForCausalLM.from_pretrained(b).eval()
    torch.testing.assert_close(logits(sliced), logits(nested, variant), atol=1e-5, rtol=1e-5)


def test_a_slice_reads_only_what_it_writes(elastic, tmp_path):
    """Prefix reads: the bytes read are exactly the variant's tensors, written in shards that load as the variant."""
    nested, src = elastic
    with open_checkpoint(src) as reader:
        out = slice_checkpoint(reader, "medium", tmp_path / "medium", max_shard_size=SHARD // 2, show_progress=False)
        total = sum(reader.nbytes(name) for name in reader.names())
        read = reader.bytes_read
    written = weights(out)
    assert read == sum(t.numel() * t.element_size() for t in written.values()) < 0.7 * total
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    sliced = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(sliced), logits(nested, "medium"), atol=1e-5, rtol=1e-5)


def test_slice_with_a_dtype_and_the_source_tokenizer(elastic, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    nested, src = elastic
    with_tok = tmp_path / "src"
    with_tok.mkdir()
    for path in src.iterdir():
        (with_tok / path.name).write_bytes(path.read_bytes())
    tok = Tokenizer(models.WordLevel(vocab={chr(i + 48): i for i in range(128)}, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="0").save_pretrained(with_tok)
    out = slice_checkpoint(with_tok, "small", tmp_path / "bf16", dtype=torch.bfloat16, show_progress=False)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(with_tok).get_vocab()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reference = nested.slice_variant("small").state_dict()
    streamed = weights(out)
    assert sorted(streamed) == sorted(reference)
    assert all(torch.equal(streamed[k], v.to(torch.bfloat16)) for k, v in reference.items())


# ---- bad input: one sentence, nothing left at the output -----------------------------------------------------------
def _refused(call, error, pattern, parent: Path) -> None:
    with pytest.raises(error, match=pattern) as info:
        call()
    assert "\n" not in str(info.value)
    assert not [p for p in parent.iterdir() if p.name.startswith(("out", ".out"))]


def test_bad_input_is_one_sentence_and_writes_nothing(full, elastic, per_layer, tmp_path):
    _, stats, plain = full
    _, src = elastic
    _, narrow = per_layer
    out = tmp_path / "out"
    # configs alone: the source is checked before any weight is looked for
    config_only, stock = tmp_path / "config_only", tmp_path / "stock"
    tiny_config(elastic={"variants": VARIANTS}).save_pretrained(config_only)
    CASES["qwen3_moe"].save_pretrained(stock)
    slices = [
        (config_only, "tiny", {}, KeyError, r"elastic_variant='tiny' is not a variant.*\['small', 'medium', 'full'\]"),
        (plain, "small", {}, ValueError, r"elastic_variant='small': this SlimMoeConfig has no elastic variants"),
        (stock, "small", {}, ValueError, r"slicing a variant needs a SlimMoe checkpoint.*model_type='qwen3_moe'"),
        (src, "small", {"model_type": "llama"}, ValueError, r"model_type='llama' is not a family.*qwen3_moe"),
        (src, "small", {"model_type": "qwen2_moe"}, ValueError, r"Cannot convert SlimMoe to 'qwen2_moe': .*qk_norm"),
        (narrow, "narrow", {"model_type": "qwen3_moe"}, ValueError, r"variant 'narrow' has per-layer moe_intermediate"),
        (src, "small", {"dtype": "int8"}, ValueError, r"dtype='int8' is not a floating-point torch dtype"),
    ]
    for source_folder, variant, kwargs, error, pattern in slices:
        call = functools.partial(slice_checkpoint, source_folder, variant, out, show_progress=False, **kwargs)
        _refused(call, error, pattern, tmp_path)
    nests = [
        (stock, {}, ValueError, r"make_elastic_checkpoint needs a SlimMoe checkpoint.*model_type='qwen3_moe'"),
        (plain, {"statistics": None}, ValueError, r"statistics: make_elastic orders every axis by importance"),
        (plain, {"variants": {"small": {"hidden_size": 64}}}, ValueError, r"'small'.*hidden_size=64"),
        (plain, {"layer_method": "first"}, ValueError, r"layer_method='first': valid values are"),
        (plain, {"max_shard_size": "lots"}, ValueError, r"max_shard_size='lots' is not a size"),
    ]
    for source_folder, kwargs, error, pattern in nests:
        kwargs = {"variants": VARIANTS, "statistics": stats, **kwargs}
        call = functools.partial(make_elastic_checkpoint, source_folder, out, show_progress=False, **kwargs)
        _refused(call, error, pattern, tmp_path)
    foreign = _stats(SlimMoeForCausalLM(tiny_config(num_hidden_layers=2, mlp_layer_types=None)))
    with pytest.raises(ValueError):
        make_elastic_checkpoint(plain, out, VARIANTS, foreign, show_progress=False)
    assert not out.exists()
    with pytest.raises(ValueError, match="is the source folder"):
        slice_checkpoint(src, "small", src, overwrite=True, show_progress=False)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        slice_checkpoint(src, "small", tmp_path / "kept", show_progress=False)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["mine.txt"]


def test_slice_cli_reports_bytes_read_and_written(elastic, tmp_path, capsys):
    from huggingface_hub import ModelCard

    _, elastic_src = elastic
    src = tmp_path / "elastic"  # an elastic checkpoint whose card names the Hub model it was made from
    src.mkdir()
    for path in elastic_src.iterdir():
        (src / path.name).write_bytes(path.read_bytes())
    card = ModelCard.load(src / "README.md")
    card.data.base_model, card.data.license, card.data.license_name = "Qwen/Qwen3-30B-A3B", "apache-2.0", None
    card.save(src / "README.md")
    assert main(["slice", str(src), "small", str(tmp_path / "small"), "--to", "qwen3_moe", "--drop-mtp"]) == 0
    shown = capsys.readouterr().out
    assert "bytes read / written" in shown and "parameters (total / active)" in shown
    assert not (tmp_path / "small" / "mtp.safetensors").exists()
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "small"), Qwen3MoeForCausalLM)
    data = ModelCard.load(tmp_path / "small" / "README.md").data
    assert (data.base_model, data.base_model_relation, data.license) == ("Qwen/Qwen3-30B-A3B", "finetune", "apache-2.0")
    assert data.eval_results is None  # nothing measured
