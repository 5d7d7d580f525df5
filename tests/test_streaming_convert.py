"""convert_checkpoint (tensor by tensor from disk) writes what the in-memory conversion writes: save_for_hub(from_hf(
model)) to SlimMoe, save_for_hub(slim, model_type=...) back, for every convertible family; the folders load with stock
from_pretrained and give the in-memory model's logits."""

from __future__ import annotations

import filecmp
import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

sys.path.insert(0, os.path.dirname(__file__))
from test_convert import CASES, _stock  # noqa: E402

from hf_slim import convert_checkpoint  # noqa: E402
from hf_slim.checkpoints import CheckpointError, StateDictReader, open_checkpoint  # noqa: E402
from hf_slim.cli import main  # noqa: E402
from hf_slim.convert import SUPPORTED_MODEL_TYPES, from_hf  # noqa: E402
from hf_slim.hub import save_for_hub  # noqa: E402
from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM  # noqa: E402

SHARD = 30_000  # the tiny sources are saved in several shards
IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
_SOURCES: dict[str, tuple] = {}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return out


def same_folders(a: Path, b: Path, fresh: tuple[str, ...] = ()) -> None:
    """Same file names, every non-weight file byte for byte, every tensor bitwise (but the `fresh` ones: new random
    inits, compared by shape and dtype)."""
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        if not name.endswith(".safetensors"):  # config, generation config, card, index, SlimMoe's code, tokenizer
            assert filecmp.cmp(a / name, b / name, shallow=False), name
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for key in wa:
        assert wa[key].dtype == wb[key].dtype and wa[key].shape == wb[key].shape, key
        assert key in fresh or torch.equal(wa[key], wb[key]), key


def converted(src: Path) -> dict:
    """The card arguments convert_checkpoint adds by default, for the in-memory side of a comparison."""
    return {"base_model": src, "base_model_relation": "convert"}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def source(model_type: str, tmp_path_factory) -> tuple:
    """(stock model, its folder saved in shards with a tokenizer and its own generation defaults), once per family."""
    if model_type not in _SOURCES:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        model = _stock(model_type)
        model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=7)
        folder = tmp_path_factory.mktemp(f"stock-{model_type}")
        model.save_pretrained(folder, max_shard_size=SHARD)
        tok = Tokenizer(models.WordLevel(vocab={chr(i + 48): i for i in range(97)}, unk_token="0"))
        tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="0").save_pretrained(folder)
        _SOURCES[model_type] = (model, folder)
    return _SOURCES[model_type]


def _loaded(folder: Path):
    from transformers import AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_to_slim_moe_and_back_equals_the_in_memory_conversion(model_type, tmp_path, tmp_path_factory):
    stock, src = source(model_type, tmp_path_factory)
    model, tokenizer = _loaded(src)
    slim = from_hf(model, num_mtp_heads=2)
    a = save_for_hub(slim, tmp_path / "a" / "slim", processing_class=tokenizer, card_kwargs=converted(src))
    b = convert_checkpoint(src, tmp_path / "b" / "slim", num_mtp_heads=2, show_progress=False)
    # each depth's eh_proj is a fresh normal(0, initializer_range) draw on both sides; the MTP blocks copy the last
    # sparse layer, the depths' norms start at one
    same_folders(a, b, fresh=("mtp.layers.0.eh_proj.weight", "mtp.layers.1.eh_proj.weight"))
    streamed = weights(b)
    assert 0.5 * 0.02 < streamed["mtp.layers.1.eh_proj.weight"].std() < 2 * 0.02
    sparse = [i for i, kind in enumerate(slim.config.mlp_layer_types) if kind == "sparse"]
    last = slim.model.layers[sparse[-1]].state_dict()
    for key, value in slim.mtp.layers[1].state_dict().items():
        if key == "eh_proj.weight":
            continue
        assert torch.equal(streamed[f"mtp.layers.1.{key}"], value), key
        if key.split(".")[0] in ("enorm", "hnorm", "post_norm"):
            assert torch.equal(value, torch.ones_like(value)), key
        else:
            assert torch.equal(value, last[key]), key
    assert json.loads((b / "generation_config.json").read_text())["temperature"] == 0.6  # the source's defaults

    # back to the stock family, MTP tensors kept beside the stock weights (GLM-4-MoE: in its own MTP layers)
    loaded, tokenizer = _loaded(a)
    c = save_for_hub(loaded, tmp_path / "c" / "back", model_type=model_type, processing_class=tokenizer,
                     card_kwargs=converted(a))  # fmt: skip
    d = convert_checkpoint(a, tmp_path / "d" / "back", to=model_type, show_progress=False)
    same_folders(c, d)
    if model_type == "glm4_moe":
        n = stock.config.num_hidden_layers
        assert not (d / "mtp.safetensors").exists()
        assert torch.equal(weights(d)[f"model.layers.{n + 1}.eh_proj.weight"], weights(a)["mtp.layers.1.eh_proj.weight"])
    else:
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert index["weight_map"]["mtp.layers.0.eh_proj.weight"] == "mtp.safetensors"
    back = AutoModelForCausalLM.from_pretrained(d).eval()
    assert type(back) is type(stock)
    for key, value in stock.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    torch.testing.assert_close(logits(back), logits(stock), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_sharded_output_loads_with_stock_from_pretrained(model_type, tmp_path, tmp_path_factory):
    """Written in several shards, from an open reader: the SlimMoe folder gives the stock model's logits, and the
    conversion back (without MTP) loads as the stock class with the same state dict."""
    stock, src = source(model_type, tmp_path_factory)
    with open_checkpoint(src) as reader:
        out = convert_checkpoint(reader, tmp_path / "slim", max_shard_size=SHARD, show_progress=False)
        assert reader.bytes_read == sum(reader.nbytes(n) for n in reader.names())  # every tensor read once
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    slim = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(slim, SlimMoeForCausalLM) and slim.config.num_mtp_heads == 0
    torch.testing.assert_close(logits(slim), logits(stock), atol=1e-5, rtol=1e-5)
    back = convert_checkpoint(out, tmp_path / "back", to=model_type, max_shard_size=SHARD, show_progress=False)
    assert not (back / "mtp.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(reloaded) is type(stock)
    for key, value in stock.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_drop_mtp_stock_to_stock_and_dtype(tmp_path, tmp_path_factory):
    stock, src = source("mixtral", tmp_path_factory)
    slim = convert_checkpoint(src, tmp_path / "slim", num_mtp_heads=1, show_progress=False)
    dropped = convert_checkpoint(slim, tmp_path / "dropped", to="mixtral", keep_mtp=False, show_progress=False)
    assert sorted(weights(dropped)) == sorted(weights(src)) and not (dropped / "model.safetensors.index.json").exists()
    # a stock checkpoint to its own family goes through SlimMoe, as `hf-slim convert --to mixtral` does
    model, tokenizer = _loaded(src)
    a = save_for_hub(from_hf(model), tmp_path / "a" / "mixtral", model_type="mixtral", processing_class=tokenizer,
                     card_kwargs=converted(src))  # fmt: skip
    b = convert_checkpoint(src, tmp_path / "b" / "mixtral", to="mixtral", show_progress=False)
    same_folders(a, b)
    half = convert_checkpoint(src, tmp_path / "bf16", dtype="bfloat16", num_mtp_heads=1, show_progress=False)
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    streamed, state = weights(half), stock.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in streamed.values())
    assert all(torch.equal(streamed[k], v.to(torch.bfloat16)) for k, v in state.items())


def test_tensors_the_model_does_not_hold_are_left_out_with_a_warning(tmp_path):
    stock = _stock("qwen3_moe")
    state = {**stock.state_dict(), "mtp.extra.weight": torch.zeros(3)}  # e.g. Qwen3-Next's MTP weights
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) that Qwen3MoeForCausalLM does not hold.*'mtp.extra.weight'"):
        out = convert_checkpoint(StateDictReader(state, stock.config), tmp_path / "slim", show_progress=False)
    assert "mtp.extra.weight" not in weights(out)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), logits(stock), atol=1e-5, rtol=1e-5)


# ---- bad input: one sentence, refused before any weight is read, nothing left at the output -------------------------
def _config_only(config, folder: Path) -> Path:
    config.save_pretrained(folder)
    return folder


def _refused(call, error, pattern, parent: Path) -> None:
    with pytest.raises(error, match=pattern) as info:
        call()
    assert "\n" not in str(info.value)
    assert not [p for p in parent.iterdir() if p.name.startswith(("out", ".out"))]


def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    stock = _config_only(CASES["qwen3_moe"], tmp_path / "stock")  # no weights: the config alone is refused
    slim_shared = _config_only(
        SlimMoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8),
        tmp_path / "slim_shared",
    )
    per_layer = _config_only(
        SlimMoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=[8, 4]),
        tmp_path / "per_layer",
    )
    cases = [
        (stock, {"to": "llama"}, ValueError, r"to='llama' is not a family.*slim_moe, glm4_moe, mixtral, olmoe, qwen2_moe"),
        (stock, {"to": "mixtral", "num_mtp_heads": 1}, ValueError, r"num_mtp_heads=1 adds MTP depths to a SlimMoe"),
        (stock, {"num_mtp_heads": -1}, ValueError, r"num_mtp_heads=-1 must be an int >= 0"),
        (slim_shared, {"num_mtp_heads": 1}, ValueError, r"this SlimMoe source keeps its own 0"),
        (slim_shared, {"to": "qwen3_moe"}, ValueError, r"shared_expert_intermediate_size=8"),
        (per_layer, {"to": "qwen3_moe"}, ValueError, r"moe_intermediate_size is a per-layer list \[8, 4\]"),
        (stock, {"dtype": "int8"}, ValueError, r"dtype='int8' is not a floating-point torch dtype"),
        (stock, {"max_shard_size": "lots"}, ValueError, r"max_shard_size='lots' is not a size"),
        (tmp_path / "missing", {}, CheckpointError, r"missing' does not exist: no such local folder"),
        (stock, {}, CheckpointError, r"has no model.safetensors"),  # a good config, then the weights are missing
    ]
    qwen_next = _config_only(
        AutoConfig.for_model("qwen3_next", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2),
        tmp_path / "qwen3_next",
    )
    cases.append((qwen_next, {}, ValueError, r"Unsupported model_type 'qwen3_next'; hf_slim.convert supports glm4_moe, mixtral"))
    for folder, kwargs, error, pattern in cases:
        call = functools.partial(convert_checkpoint, folder, out, show_progress=False, **kwargs)
        _refused(call, error, pattern, tmp_path)


def test_existing_output_and_the_source_as_output(tmp_path, tmp_path_factory):
    _, src = source("olmoe", tmp_path_factory)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True"):
        convert_checkpoint(src, tmp_path / "out", show_progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="is the source folder"):
        convert_checkpoint(src, src, overwrite=True, show_progress=False)
    assert (src / "config.json").is_file()
    convert_checkpoint(src, tmp_path / "out", overwrite=True, show_progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_cli_convert_reports_bytes_and_refuses_before_reading(tmp_path, tmp_path_factory, capsys):
    from huggingface_hub import ModelCard

    _, stock = source("qwen2_moe", tmp_path_factory)
    src = tmp_path / "src"  # a local copy of a Hub model: its config names it, its card has the licence
    src.mkdir()
    for path in stock.iterdir():
        (src / path.name).write_bytes(path.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "_name_or_path": "Qwen/Qwen1.5-MoE-A2.7B"}))
    (src / "README.md").write_text("---\nlicense: other\nlicense_name: tongyi-qianwen\n---\n# Qwen1.5-MoE\n")
    assert main(["convert", str(src), str(tmp_path / "slim"), "--num-mtp-heads", "1"]) == 0
    shown = capsys.readouterr().out
    assert "bytes read" in shown and "bytes written" in shown
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "slim"), SlimMoeForCausalLM)
    data = ModelCard.load(tmp_path / "slim" / "README.md").data
    assert (data.base_model, data.license, data.license_name) == ("Qwen/Qwen1.5-MoE-A2.7B", "other", "tongyi-qianwen")
    assert "base_model_relation" not in data.to_dict()  # the same weights in another layout: the Hub infers one
    assert data.eval_results is None
    argv = ["convert", str(tmp_path / "slim"), str(tmp_path / "back"), "--to", "qwen2_moe", "--num-mtp-heads", "1"]
    assert main(argv) == 2
    assert "this SlimMoe source keeps its own 1" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()


# ---- MTP heads of a stock export come back ---------------------------------------------------------------------------
def _slim_with_mtp(num_mtp_heads: int = 2) -> SlimMoeForCausalLM:
    torch.manual_seed(11)
    config = SlimMoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=16, num_mtp_heads=num_mtp_heads)
    model = SlimMoeForCausalLM(config).eval()
    with torch.no_grad():  # norms and eh_proj off their init, so copying them is what the test sees
        for name, param in model.mtp.named_parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def test_stock_export_mtp_heads_round_trip_to_slim_moe(tmp_path):
    """SlimMoe with 2 MTP heads -> save_for_hub(model_type="qwen3_moe") (MTP in mtp.safetensors) -> convert_checkpoint
    back to SlimMoe: the heads are copied, not drawn anew; logits, MTP outputs and MTP decoding are the original's."""
    slim = _slim_with_mtp(2)
    stock = save_for_hub(slim, tmp_path / "stock", model_type="qwen3_moe")
    assert (stock / "mtp.safetensors").is_file()
    back = convert_checkpoint(stock, tmp_path / "back", show_progress=False)  # num_mtp_heads=0: the source's count
    assert json.loads((back / "config.json").read_text())["num_mtp_heads"] == 2
    assert "hf-slim convert" in (stock / "README.md").read_text()
    streamed = weights(back)
    for key, value in slim.mtp.state_dict().items():
        assert torch.equal(streamed[f"mtp.{key}"], value), key
    loaded = SlimMoeForCausalLM.from_pretrained(back).eval()
    assert loaded.config.num_mtp_heads == 2
    with torch.no_grad():
        want = slim(IDS, return_mtp=True, return_mtp_logits=True)
        got = loaded(IDS, return_mtp=True, return_mtp_logits=True)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=0)
    assert len(got.mtp_hidden_states) == len(want.mtp_hidden_states) == 2
    for a, b in zip(got.mtp_hidden_states, want.mtp_hidden_states):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for a, b in zip(got.mtp_logits, want.mtp_logits):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    prompt = IDS[:1]
    plain = loaded.generate(prompt, do_sample=False, max_new_tokens=12)
    drafted = loaded.generate(prompt, do_sample=False, max_new_tokens=12, use_mtp=True)
    assert torch.equal(drafted, plain)
    assert torch.equal(plain, slim.generate(prompt, do_sample=False, max_new_tokens=12))
    # the same number passed explicitly is fine; the command line round-trips too
    again = convert_checkpoint(stock, tmp_path / "again" / "back", num_mtp_heads=2, show_progress=False)
    same_folders(back, again)
    assert main(["convert", str(stock), str(tmp_path / "cli" / "back"), "--to", "slim_moe"]) == 0
    same_folders(back, tmp_path / "cli" / "back")


def test_stock_export_mtp_heads_refuse_another_count_or_shape(tmp_path):
    stock = save_for_hub(_slim_with_mtp(2), tmp_path / "stock", model_type="qwen3_moe")
    call = functools.partial(convert_checkpoint, stock, tmp_path / "out", num_mtp_heads=3, show_progress=False)
    _refused(call, ValueError, r"num_mtp_heads=3, but .* holds 2 MTP depth\(s\)", tmp_path)
    # an MTP tensor of another shape than the SlimMoe config builds: one sentence naming it and both shapes
    model = AutoModelForCausalLM.from_pretrained(stock)
    state = {**model.state_dict(), **{k: v for k, v in weights(stock).items() if k.startswith("mtp.")}}
    state["mtp.layers.1.eh_proj.weight"] = torch.zeros(32, 48)
    reader = StateDictReader(state, model.config)
    call = functools.partial(convert_checkpoint, reader, tmp_path / "out", show_progress=False)
    _refused(call, ValueError, r"'mtp.layers.1.eh_proj.weight'.*shape \[32, 48\].*holds \[32, 64\]", tmp_path)
