"""prune_checkpoint (tensor by tensor from disk) writes exactly what prune + save_pruned write for the loaded model:
same files, config, weights (bitwise), pruning record and card, for every family and expert strategy."""

from __future__ import annotations

import filecmp
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from test_anatomy import FAMILIES, tiny_model, token_batch  # noqa: E402

from hf_slim.checkpoints import CheckpointError, open_checkpoint  # noqa: E402
from hf_slim.pruning import (  # noqa: E402
    PruneConfig,
    collect_statistics,
    plan_selection,
    prune,
    prune_checkpoint,
    save_pruned,
    size_summary,
)

X = token_batch(8, 32)
SHARD = 40_000  # the tiny sources are saved as several shards
_SOURCES: dict[str, tuple] = {}

_SHARED = {"qwen2_moe", "qwen3_next", "slim_moe"}
_DENSE = {"qwen3_moe", "qwen2_moe", "qwen3_next", "slim_moe"}


def source(family: str, tmp_path_factory) -> tuple:
    """(model, stats, folder written by save_pretrained in shards), once per family."""
    if family not in _SOURCES:
        model = tiny_model(family)
        stats = collect_statistics(model, X, num_samples=8, max_length=32, batch_size=8, show_progress=False)
        folder = tmp_path_factory.mktemp(f"src-{family}")
        model.save_pretrained(folder, max_shard_size=SHARD)
        _SOURCES[family] = (model, stats, folder)
    return _SOURCES[family]


def configs(family: str) -> dict[str, PruneConfig]:
    """A merge with depth, hidden, heads, expert width and top-k; a partial preservation (router-weight similarity)
    with the shared / dense widths and KV groups where the family has them."""
    merge = {
        "num_experts": 5,
        "num_experts_per_tok": 1,
        "expert_strategy": "merge",
        "moe_intermediate_size": 8,
        "num_hidden_layers": 3,
    }
    preserve = {
        "num_experts": 4,
        "expert_strategy": "partial_preserve",
        "merge_similarity": "router_weight",
        "depth_method": "block_influence",
        "num_hidden_layers": 3,
    }
    if family == "olmoe":  # q/k norms are sized by hidden_size: heads and hidden shrink together
        merge.update(hidden_size=16, num_attention_heads=2, num_key_value_heads=2)
    else:
        merge.update(hidden_size=24, num_attention_heads=2)
        preserve.update(num_attention_heads=2, num_key_value_heads=1)
    if family in _SHARED:
        preserve["shared_expert_intermediate_size"] = 12
    if family in _DENSE:
        preserve["intermediate_size"] = 24
    return {"merge": PruneConfig(**merge), "partial_preserve": PruneConfig(**preserve)}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        if path.name == "importance_stats.safetensors":
            continue
        with safe_open(str(path), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


def logits(model, x=X[:2]):
    with torch.no_grad():
        return model(x).logits


def in_memory(family, tmp_path_factory, pc, folder, **kwargs):
    model, stats, _ = source(family, tmp_path_factory)
    small = prune(model, pc, stats)
    return small, save_pruned(small, folder, prune_config=pc, before=size_summary(model), **kwargs)


@pytest.mark.parametrize("strategy", ["merge", "partial_preserve"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_prune_and_save_pruned(family, strategy, tmp_path, tmp_path_factory):
    _, stats, src = source(family, tmp_path_factory)
    pc = configs(family)[strategy]
    # the streamed card names its source folder as `base_model`; the in-memory one is told it
    _, a = in_memory(
        family, tmp_path_factory, pc, tmp_path / "a" / "pruned", calibration="8 x 32 tokens", base_model=src
    )
    b = prune_checkpoint(src, tmp_path / "b" / "pruned", pc, stats, calibration="8 x 32 tokens", show_progress=False)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        if not name.endswith(".safetensors"):  # config, generation config, card, record, SlimMoe's code
            assert filecmp.cmp(a / name, b / name, shallow=False), name
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for key in wa:
        assert wa[key].dtype == wb[key].dtype and torch.equal(wa[key], wb[key]), key
    assert json.loads((b / "pruning_config.json").read_text())["report"]["merges"]  # the merge path ran


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "slim_moe"])
def test_sharded_output_loads_with_stock_from_pretrained(family, tmp_path, tmp_path_factory):
    """The streamed folder, written in several shards, loads with from_pretrained and gives the in-memory pruned
    model's logits; a reader passed in shows that only part of the checkpoint was read."""
    model, stats, src = source(family, tmp_path_factory)
    pc = configs(family)["merge"]
    pc.expert_strategy = "reap"  # no merges: pruned experts are never read
    small = prune(model, pc, stats)
    with open_checkpoint(src) as reader:
        out = prune_checkpoint(reader, tmp_path / "pruned", pc, stats, max_shard_size=SHARD, show_progress=False)
        total = sum(reader.nbytes(n) for n in reader.names())
        assert reader.bytes_read < 0.8 * total
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is type(small)
    for name, tensor in small.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # same weights bitwise; the in-memory model's tensors keep the strides of their selection, which moves the last
    # bits of some kernels' sums
    torch.testing.assert_close(logits(loaded), logits(small), rtol=1e-5, atol=1e-5)


def test_a_streamed_folder_is_a_source_again(tmp_path, tmp_path_factory):
    """Progressive pruning from disk: a streamed SlimMoe folder (with auto_map and its modeling code) is read back
    as the next step's source and gives what pruning in memory twice gives."""
    model, _, src = source("slim_moe", tmp_path_factory)
    first, second = PruneConfig(num_hidden_layers=3), PruneConfig(num_hidden_layers=2)
    step = prune_checkpoint(src, tmp_path / "step1", first, show_progress=False)
    assert "auto_map" in json.loads((step / "config.json").read_text())
    out = prune_checkpoint(step, tmp_path / "step2", second, show_progress=False)
    twice = prune(prune(model, first), second)
    streamed = weights(out)
    assert sorted(streamed) == sorted(twice.state_dict())
    assert all(torch.equal(streamed[k], twice.state_dict()[k]) for k in streamed)


def test_dtype_cast_and_tokenizer_from_source(tmp_path, tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model, stats, src = source("qwen3_moe", tmp_path_factory)
    with_tok = tmp_path / "src"
    with_tok.mkdir()
    for path in src.iterdir():
        (with_tok / path.name).write_bytes(path.read_bytes())
    tok = Tokenizer(models.WordLevel(vocab={chr(i): i for i in range(160)}, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0))
    tokenizer.save_pretrained(with_tok)
    pc = PruneConfig(num_experts=4, moe_intermediate_size=8)
    out = prune_checkpoint(with_tok, tmp_path / "bf16", pc, stats, dtype="bfloat16", show_progress=False)
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    small = prune(model, pc, stats)
    streamed = weights(out)
    state = small.state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state[name].to(torch.bfloat16)), name
    assert all(t.dtype == torch.bfloat16 for t in streamed.values())


def test_card_names_the_hub_model_a_local_source_stands_for(tmp_path, tmp_path_factory):
    """A local source whose config's `_name_or_path` is a Hub id and whose card has a licence: the pruned card's
    `base_model` is that id (relation `finetune`: the Hub has none for pruning), the licence is inherited, only the
    Hub calibration dataset is listed, and a `model-index` only where something was measured."""
    from huggingface_hub import ModelCard

    _, stats, src = source("qwen3_moe", tmp_path_factory)
    named = _copy(src, tmp_path / "src")
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "_name_or_path": "Qwen/Qwen3-30B-A3B"}))
    (named / "README.md").write_text("---\nlicense: apache-2.0\n---\n# source\n")
    pc = PruneConfig(num_experts=4)
    datasets = ["allenai/c4", "calib.txt"]  # a Hub dataset and a local file
    out = prune_checkpoint(named, tmp_path / "out", pc, stats, datasets=datasets, show_progress=False)
    data = ModelCard.load(out / "README.md").data
    assert (data.base_model, data.base_model_relation, data.license) == ("Qwen/Qwen3-30B-A3B", "finetune", "apache-2.0")
    assert data.datasets == ["allenai/c4"] and data.eval_results is None
    _, measured = in_memory("qwen3_moe", tmp_path_factory, pc, tmp_path / "measured", base_model=named,
                            eval_results={"eval_loss": 2.5, "note": "not a number"})  # fmt: skip
    data = ModelCard.load(measured / "README.md").data
    assert data.base_model == "Qwen/Qwen3-30B-A3B" and data.license == "apache-2.0"
    assert [(r.metric_name, r.metric_value) for r in data.eval_results] == [("eval_loss", 2.5)]


def test_plan_selection_on_the_meta_device_needs_tensors_for_router_weights(tmp_path_factory):
    model, stats, src = source("mixtral", tmp_path_factory)
    with torch.device("meta"):
        structure = AutoModelForCausalLM.from_config(model.config)
    pc = PruneConfig(num_experts=4, expert_strategy="merge", merge_similarity="router_weight")
    with pytest.raises(ValueError, match="meta device; pass tensors="):
        plan_selection(structure, pc, stats)
    with open_checkpoint(src) as reader:
        sel, merges, _, report = plan_selection(structure, pc, stats, tensors=reader)
    ref_sel, ref_merges, _, ref_report = plan_selection(model, pc, stats)
    assert report == ref_report and sorted(merges) == sorted(ref_merges)
    assert all(torch.equal(sel["expert"][k], ref_sel["expert"][k]) for k in sel["expert"])


# ---- bad input: one sentence, nothing left at the output ---------------------------------------------------------
def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for path in folder.iterdir():
        (dest / path.name).write_bytes(path.read_bytes())
    return dest


def _nothing_written(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]  # no temporary folder either


@pytest.mark.parametrize("damage", ["missing shard", "truncated shard", "index names an absent file"])
def test_damaged_source_is_one_sentence_and_writes_nothing(damage, tmp_path, tmp_path_factory):
    _, stats, src = source("qwen2_moe", tmp_path_factory)
    folder = _copy(src, tmp_path / "src")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    if damage == "missing shard":
        shard.unlink()
        pattern = f"names shard '{shard.name}'.*does not exist"
    elif damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-64])
        pattern = f"{shard.name} is truncated: its header describes"
    else:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = "model-00099-of-00099.safetensors"
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        pattern = "names shard 'model-00099-of-00099.safetensors'.*does not exist"
    out = tmp_path / "outputs"
    out.mkdir()
    with pytest.raises(CheckpointError, match=pattern) as error:
        prune_checkpoint(folder, out / "out", PruneConfig(num_experts=4), stats, show_progress=False)
    assert "\n" not in str(error.value)
    _nothing_written(out)


def test_bad_options_are_one_sentence_and_write_nothing(tmp_path, tmp_path_factory):
    _, stats, src = source("qwen3_moe", tmp_path_factory)
    out = tmp_path / "outputs"
    out.mkdir()
    pc = PruneConfig(num_experts=4)
    with pytest.raises(ValueError, match=r"max_shard_size='lots' is not a size") as error:
        prune_checkpoint(src, out / "out", pc, stats, max_shard_size="lots", show_progress=False)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"dtype='int8' is not a floating-point torch dtype"):
        prune_checkpoint(src, out / "out", pc, stats, dtype="int8", show_progress=False)
    _nothing_written(out)
    existing = out / "out"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True") as error:
        prune_checkpoint(src, existing, pc, stats, show_progress=False)
    assert "\n" not in str(error.value)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert [p.name for p in out.iterdir()] == ["out"]
    prune_checkpoint(src, existing, pc, stats, overwrite=True, show_progress=False)
    assert (existing / "config.json").is_file() and not (existing / "keep.txt").exists()
    # a failure midway (statistics that do not fit the model) leaves nothing behind
    with pytest.raises(ValueError, match="stats"):
        prune_checkpoint(src, out / "other", PruneConfig(num_experts=4), None, show_progress=False)
    _nothing_written(out, "other")
