"""hf_slim.checkpoints: the stored layout checked against transformers itself (save_pretrained / from_pretrained),
lazy partial reads, the sharded writer, open_checkpoint and the one-sentence errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from test_anatomy import FAMILIES, tiny_model  # noqa: E402

from hf_slim.anatomy import (  # noqa: E402
    get_spec,
    index_tensor,
    layers_with,
    normalize_selection,
    read_indexed,
    tensor_index,
)
from hf_slim.checkpoints import (  # noqa: E402
    CheckpointError,
    CheckpointReader,
    ShardedCheckpointWriter,
    StateDictReader,
    open_checkpoint,
)

# small enough that every tiny model is written as several shards
SHARD = 40_000


def _untied_state(model) -> dict[str, torch.Tensor]:
    """The state dict save_pretrained writes: tied copies (lm_head when embeddings are tied) left out."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files, under its stored name."""
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (model, folder written by save_pretrained in shards)."""
    out = {}
    for family in FAMILIES:
        model = tiny_model(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder, max_shard_size=SHARD)
        out[family] = (model, folder)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_reader_yields_the_state_dict_save_pretrained_wrote(family, saved):
    model, folder = saved[family]
    assert (folder / "model.safetensors.index.json").is_file()  # sharded: the reader follows the index
    state = _untied_state(model)
    with CheckpointReader(folder) as reader:
        assert reader.spec is get_spec(family if family != "slim_moe_full_qk_norm" else "slim_moe")
        assert sorted(reader.names()) == sorted(state)
        for name in reader.names():
            tensor = reader.read(name)
            assert tensor.dtype == state[name].dtype and torch.equal(tensor, state[name]), name
            assert reader.shape(name) == tuple(state[name].shape)
            assert reader.dtype(name) == state[name].dtype
            assert reader.nbytes(name) == state[name].numel() * state[name].element_size()
        assert reader.bytes_read == sum(t.numel() * t.element_size() for t in state.values())
        block = reader.block_names("model.layers.1")
        assert block and all(n.startswith("model.layers.1.") for n in block)


@pytest.mark.parametrize("family", FAMILIES)
def test_writer_writes_what_save_pretrained_writes(family, saved, tmp_path):
    """The writer's folder loads with stock from_pretrained to the same state dict, under the same stored names."""
    model, folder = saved[family]
    state = _untied_state(model)
    out = tmp_path / "written"
    with ShardedCheckpointWriter(out, spec=get_spec(model), config=model.config, max_shard_size=SHARD) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
    model.config.save_pretrained(out)
    stored, reference = _stored(out), _stored(folder)
    assert sorted(stored) == sorted(reference)
    assert all(torch.equal(stored[k], reference[k]) for k in stored)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert (
        index["metadata"]["total_size"]
        == writer.bytes_written
        == sum(t.numel() * t.element_size() for t in state.values())
    )
    with safe_open(str(out / shards[0]), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    model = tiny_model("qwen3_moe")
    with ShardedCheckpointWriter(tmp_path, spec=get_spec(model), config=model.config) as writer:
        for name, tensor in model.state_dict().items():
            writer.add(name, tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with CheckpointReader(tmp_path, config=model.config) as reader:
        assert sorted(reader.names()) == sorted(model.state_dict())


def test_header_larger_than_its_reserved_room_is_rewritten(tmp_path):
    """Many tiny tensors overflow the room reserved for a shard's header; the shard is then rewritten whole."""
    model = tiny_model("qwen3_moe")
    tensors = {f"extra.t{i}": torch.full((1,), float(i)) for i in range(400)}
    with ShardedCheckpointWriter(tmp_path, spec=get_spec(model), config=model.config, max_shard_size="1MB") as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    assert writer._reserve == 4096  # the header below needs more
    stored = _stored(tmp_path)
    assert stored.keys() == tensors.keys() and all(torch.equal(stored[k], v) for k, v in tensors.items())
    assert not list(tmp_path.glob("*.partial*")) and not list(tmp_path.glob("*.data"))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "slim_moe"])
def test_fused_experts_read_only_the_selected_experts_and_rows(family, saved):
    model, folder = saved[family]
    name = "model.layers.3.mlp.experts.gate_up_proj"
    full = model.state_dict()[name]  # [8, 2 * 16, 32]
    runs = [[(5, 7), (1, 2)], [(10, 20), (30, 32)], [(4, 12)]]  # rows 10-19 cross from gate into up
    with CheckpointReader(folder) as reader:
        part = reader.read(name, runs)
        rows = torch.cat([torch.arange(10, 20), torch.arange(30, 32)])
        expected = full[[5, 6, 1]][:, rows][:, :, 4:12]
        assert torch.equal(part, expected)
        assert reader.bytes_read == expected.numel() * expected.element_size()  # nothing beyond the selection


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "slim_moe_full_qk_norm"])
def test_read_indexed_through_readers_equals_in_memory_indexing(family, saved):
    """anatomy.read_indexed on a reader (1-D runs and per-expert 2-D gathers) == index_tensor on the model tensor."""
    model, folder = saved[family]
    config, spec = model.config, get_spec(model)
    g = torch.Generator().manual_seed(0)
    blocks = [key for _, key in layers_with(model, spec, "experts")]
    sel = normalize_selection(
        spec,
        {
            "layer": [3, 0, 2],
            "hidden": torch.randperm(32, generator=g)[:24],
            "expert": {b: torch.randperm(8, generator=g)[:5] for b in blocks},
            "expert_ffn": {b: torch.stack([torch.randperm(16, generator=g)[:8] for _ in range(8)]) for b in blocks},
        },
    )
    state = _untied_state(model)
    with CheckpointReader(folder) as reader:
        memory = StateDictReader(state, config)
        for name in reader.names():
            idx = tensor_index(spec, name, reader.shape(name), config, sel)
            if idx is None:
                continue
            expected = index_tensor(state[name], idx)
            assert torch.equal(read_indexed(reader, name, idx), expected), name
            assert torch.equal(read_indexed(memory, name, idx), expected), name


def test_many_scattered_runs_read_the_dim_whole(saved):
    """A scattered selection along the last dim of every row would cost one read per run and row; the reader then
    reads the dim whole and selects in memory (same result)."""
    model, folder = saved["qwen3_moe"]
    full = model.state_dict()["model.embed_tokens.weight"]  # [160, 32]
    cols = list(range(0, 32, 2))
    with CheckpointReader(folder) as reader:
        part = reader.read("model.embed_tokens.weight", [None, [(c, c + 1) for c in cols]])
        assert torch.equal(part, full[:, cols])


def test_state_dict_reader_interface():
    model = tiny_model("mixtral")
    reader = StateDictReader(model.state_dict(), model.config)
    name = "model.layers.0.mlp.experts.down_proj"
    assert reader.shape(name) == (8, 32, 16) and reader.dtype(name) == torch.float32
    assert reader.nbytes(name) == 8 * 32 * 16 * 4
    part = reader.read(name, [[(2, 4)], None, [(0, 3)]])
    assert torch.equal(part, model.state_dict()[name][2:4, :, :3])
    assert reader.bytes_read == part.numel() * 4 and reader.block_names("model.layers.0")


# ---- open_checkpoint ------------------------------------------------------------------------------------------
def test_open_checkpoint_local_folder_and_offline_hub_cache(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    model, folder = saved["qwen3_moe"]
    with open_checkpoint(folder) as reader:
        assert isinstance(reader, CheckpointReader) and reader.folder == Path(folder)
    # a Hub id resolved from the local cache (the suite runs offline)
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-moe"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in Path(folder).iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with open_checkpoint("tiny-org/tiny-moe") as reader:
        assert reader.folder == snapshot
        name = "model.layers.1.mlp.experts.down_proj"
        assert torch.equal(reader.read(name), model.state_dict()[name])
    with pytest.raises(CheckpointError, match="'tiny-org/absent' is neither a local folder nor a Hub model id") as e:
        open_checkpoint("tiny-org/absent")
    _one_line(e)
    with pytest.raises(CheckpointError, match="is a file") as e:
        open_checkpoint(Path(folder) / "config.json")
    _one_line(e)


# ---- bad input: one sentence naming the file ------------------------------------------------------------------
def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for path in folder.iterdir():
        (dest / path.name).write_bytes(path.read_bytes())
    return dest


def test_folder_without_config(saved, tmp_path):
    folder = _copy(saved["qwen3_moe"][1], tmp_path / "ckpt")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json") as e:
        CheckpointReader(folder)
    _one_line(e)


def test_folder_without_safetensors_and_bin_only(saved, tmp_path):
    model, _ = saved["qwen3_moe"]
    folder = tmp_path / "ckpt"
    model.config.save_pretrained(folder)
    with pytest.raises(CheckpointError, match="has no model.safetensors or model.safetensors.index.json") as e:
        CheckpointReader(folder)
    _one_line(e)
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*convert it to safetensors first") as e:
        CheckpointReader(folder)
    _one_line(e)


def test_index_naming_an_absent_shard(saved, tmp_path):
    folder = _copy(saved["mixtral"][1], tmp_path / "ckpt")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard '{shard.name}'.*does not exist") as e:
        CheckpointReader(folder)
    _one_line(e)


def test_truncated_shard_names_the_file_and_sizes(saved, tmp_path):
    folder = _copy(saved["qwen3_moe"][1], tmp_path / "ckpt")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size - 100])
    with pytest.raises(
        CheckpointError, match=rf"{shard.name} is truncated: .* {size} bytes but the file has {size - 100}"
    ) as e:
        CheckpointReader(folder)
    _one_line(e)
    shard.write_bytes(b"\x00" * 4)  # shorter than the header length itself
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated or not a safetensors file") as e:
        CheckpointReader(folder)
    _one_line(e)


def test_quantized_checkpoint_names_its_scale_tensors(saved, tmp_path):
    model, _ = saved["qwen3_moe"]
    folder = tmp_path / "ckpt"
    model.config.save_pretrained(folder)
    save_file(
        {
            "model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32).to(torch.float8_e4m3fn),
            "model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(1, 1),
        },
        str(folder / "model.safetensors"),
    )
    with pytest.raises(
        CheckpointError, match=r"quantized checkpoint .*'model.layers.0.self_attn.q_proj.weight_scale_inv'"
    ) as e:
        CheckpointReader(folder)
    _one_line(e)


def test_missing_expert_is_named(saved, tmp_path):
    model, _ = saved["qwen3_moe"]
    folder = tmp_path / "ckpt"
    model.config.save_pretrained(folder)
    state = {
        f"model.layers.1.mlp.experts.{e}.{p}_proj.weight": torch.zeros(4, 4)
        for e in (0, 2)
        for p in ("gate", "up", "down")
    }
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"is missing expert 1 \('model.layers.1.mlp.experts.1.\w+_proj.weight'\)"
    ) as e:
        CheckpointReader(folder)
    _one_line(e)


def test_writer_bad_input_and_abort(tmp_path):
    model = tiny_model("qwen3_moe")
    spec = get_spec(model)
    for bogus in ("5 parsecs", "big", 0, -3, None):
        with pytest.raises(ValueError, match=r"max_shard_size=.* is not a size") as e:
            ShardedCheckpointWriter(tmp_path / "w", spec=spec, config=model.config, max_shard_size=bogus)
        _one_line(e)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
    # an exception inside the with block removes every file the writer made
    out = tmp_path / "aborted"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedCheckpointWriter(out, spec=spec, config=model.config, max_shard_size=SHARD) as writer:
            for name, tensor in model.state_dict().items():
                writer.add(name, tensor)
            raise RuntimeError("boom")
    assert list(out.iterdir()) == []
    with ShardedCheckpointWriter(tmp_path / "ok", spec=spec, config=model.config) as writer:
        writer.add("model.norm.weight", torch.ones(32))
        with pytest.raises(ValueError, match="added twice"):
            writer.add("model.norm.weight", torch.ones(32))
    with pytest.raises(FileExistsError, match="already holds weights"):
        ShardedCheckpointWriter(tmp_path / "ok", spec=spec, config=model.config)
