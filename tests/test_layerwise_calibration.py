"""Layer-by-layer calibration of a checkpoint: the statistics of the in-memory pass for every family (MTP heads
included), hidden states spilled to disk, a killed run resumed without redoing finished blocks, bf16 kept, and clear
errors for too little memory or a work folder of another run."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from test_anatomy import FAMILIES, tiny_model, token_batch  # noqa: E402

from hf_slim.checkpoints import StateDictReader, open_checkpoint  # noqa: E402
from hf_slim.pruning import collect_statistics  # noqa: E402
from hf_slim.pruning import layerwise, layerwise_state  # noqa: E402
from hf_slim.pruning.layerwise import collect_statistics_layerwise  # noqa: E402

X = token_batch(8, 32)
KW = dict(num_samples=8, max_length=32, batch_size=3, show_progress=False)  # batches of 3, 3, 2 rows
MTP = "slim_moe_full_qk_norm"  # SlimMoe with 2 MTP heads


def _saved(tmp_path, family, dtype=torch.float32):
    folder = tmp_path / family
    tiny_model(family).to(dtype).save_pretrained(folder)
    return folder


def _assert_same(got, ref, rtol=1e-5, atol=1e-5):
    assert got.metadata == ref.metadata
    assert sorted(got.tensors) == sorted(ref.tensors)
    for key in ref.tensors:
        torch.testing.assert_close(got[key], ref[key], rtol=rtol, atol=atol, msg=key)


@pytest.fixture
def loads(monkeypatch):
    """Count materialisations per module path; `loads.fail_at = (prefix, batch)` raises inside that block's forward."""

    class Loads(list):
        fail_at = None

    seen = Loads()
    real = layerwise._Run._load

    def load(self, module, prefix):
        real(self, module, prefix)
        seen.append(prefix)
        if seen.fail_at and prefix == seen.fail_at[0]:
            calls = []

            def boom(_m, _args):
                calls.append(1)
                if len(calls) == seen.fail_at[1]:
                    raise KeyboardInterrupt("killed")  # what Ctrl-C or a scheduler does mid-block

            module.register_forward_pre_hook(boom)

    monkeypatch.setattr(layerwise._Run, "_load", load)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_statistics_equal_the_in_memory_pass(tmp_path, family, loads):
    folder = _saved(tmp_path, family)
    ref = collect_statistics(AutoModelForCausalLM.from_pretrained(folder), X, **KW)
    got = collect_statistics(str(folder), X, **KW)  # a folder dispatches to the layer-by-layer pass
    _assert_same(got, ref)
    blocks = ref.metadata["blocks"]
    assert [p for p in loads if p in blocks] == blocks  # one materialisation per block, in order
    if family == MTP:
        assert blocks[-2:] == ["mtp.layers.0", "mtp.layers.1"] and (got["expert.frequency"][-2:].sum(-1) > 0).all()
    with open_checkpoint(folder) as reader:  # an open reader is used and left open
        again = collect_statistics_layerwise(reader, X, **KW)
        assert reader.read("model.norm.weight").shape == (32,)
    _assert_same(again, ref)


def test_state_dict_reader_and_model_only_options(tmp_path):
    model = tiny_model("qwen2_moe")
    ref = collect_statistics(model, X, **KW)
    _assert_same(collect_statistics(StateDictReader(model.state_dict(), model.config), X, **KW), ref)
    with pytest.raises(TypeError, match=r"\['work_dir'\] apply to a checkpoint"):
        collect_statistics(model, X, work_dir=tmp_path, **KW)


def _plan(folder, batch_size=3):
    with open_checkpoint(folder) as reader:
        run = layerwise._Run(reader, X, torch.float32, torch.device("cpu"), batch_size)
        return run.memory_plan(10**15, None)


@pytest.mark.parametrize("work_dir", [True, False])
def test_spilled_hidden_states_give_the_in_memory_numbers(tmp_path, monkeypatch, work_dir):
    folder = _saved(tmp_path, MTP)
    in_memory = collect_statistics(str(folder), X, **KW)
    plan = _plan(folder)
    assert plan.in_memory and plan.hidden == 8 * 32 * 32 * 4
    folders = []
    real = layerwise_state.HiddenStates.start
    monkeypatch.setattr(layerwise_state.HiddenStates, "start",
                        lambda self, f, path: (folders.append(f), real(self, f, path))[1])  # fmt: skip
    work = tmp_path / "work" if work_dir else None
    spilled = collect_statistics(str(folder), X, max_memory=plan.need + plan.hidden // 2, work_dir=work, **KW)
    assert folders[0] is not None and folders[0].path == (str(work) if work_dir else folders[0].path)
    _assert_same(spilled, in_memory, rtol=0, atol=0)  # the same arithmetic on the same values
    assert not os.path.exists(folders[0].path)  # work files (and the emptied folder) removed on success


@pytest.mark.parametrize("spill", [False, True])
def test_a_killed_run_resumes_after_the_last_finished_block(tmp_path, loads, spill):
    folder = _saved(tmp_path, MTP)
    plan = _plan(folder)
    memory = dict(max_memory=plan.need + plan.hidden // 2) if spill else {}
    whole = collect_statistics(str(folder), X, **KW)
    work = tmp_path / "work"
    loads.clear()
    loads.fail_at = ("model.layers.2", 2)  # killed during the second batch of block 2: blocks 0 and 1 are done
    with pytest.raises(KeyboardInterrupt):
        collect_statistics(str(folder), X, work_dir=work, **memory, **KW)
    progress = json.loads((work / "progress.json").read_text())
    assert progress["done"] == 3  # embeddings, model.layers.0, model.layers.1
    loads.clear()
    loads.fail_at = None
    resumed = collect_statistics(str(folder), X, work_dir=work, **memory, **KW)
    blocks = [p for p in loads if p.startswith(("model.layers.", "mtp.layers."))]
    assert blocks == ["model.layers.2", "model.layers.3", "mtp.layers.0", "mtp.layers.1"]
    assert loads.count("model.embed_tokens") == 2  # not the embeddings step again: only the two MTP depths
    _assert_same(resumed, whole)
    assert not work.exists()


def test_work_dir_of_other_inputs_is_refused_and_kept_files_answer_at_once(tmp_path, loads):
    folder = _saved(tmp_path, "qwen3_moe")
    work = tmp_path / "work"
    loads.fail_at = ("model.layers.1", 1)
    with pytest.raises(KeyboardInterrupt):
        collect_statistics(str(folder), X, work_dir=work, **KW)
    with pytest.raises(ValueError, match=r"batch_size \(3 there, 4 now\).*another work_dir"):
        collect_statistics(str(folder), X, work_dir=work, **{**KW, "batch_size": 4})
    with pytest.raises(ValueError, match=r"different inputs \(calibration token ids\)"):
        collect_statistics(str(folder), token_batch(8, 32, offset=5), work_dir=work, **KW)
    with pytest.raises(ValueError, match=r"dtype \('float32' there, 'bfloat16' now\)"):
        collect_statistics(str(folder), X, work_dir=work, dtype="bf16", **KW)
    loads.fail_at = None
    done = collect_statistics(str(folder), X, work_dir=work, keep_work_files=True, **KW)
    assert sorted(os.listdir(work)) == ["progress.json", "stats-00006.safetensors"]
    loads.clear()
    _assert_same(collect_statistics(str(folder), X, work_dir=work, **KW), done, rtol=0, atol=0)
    assert loads == [] and not work.exists()


def test_bf16_checkpoint_runs_in_bf16(tmp_path, loads, monkeypatch):
    folder = _saved(tmp_path, "qwen3_moe", torch.bfloat16)
    seen = set()
    real = layerwise._Run._block

    def block(self, i, writes):
        module = self.model.get_submodule(self.blocks[i])
        handle = module.register_forward_pre_hook(
            lambda m, args: seen.add((args[0].dtype, m.input_layernorm.weight.dtype))
        )
        try:
            real(self, i, writes)
        finally:
            handle.remove()

    monkeypatch.setattr(layerwise._Run, "_block", block)
    got = collect_statistics(str(folder), X, **KW)
    assert seen == {(torch.bfloat16, torch.bfloat16)}
    ref = collect_statistics(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16), X, **KW)
    _assert_same(got, ref, rtol=2e-2, atol=2e-2)
    seen.clear()
    collect_statistics(str(folder), X, dtype=torch.float32, **KW)
    assert seen == {(torch.float32, torch.float32)}


def test_too_little_memory_and_bad_options_fail_in_one_sentence(tmp_path):
    folder = _saved(tmp_path, "olmoe")
    need = _plan(folder).need
    with pytest.raises(ValueError, match=r"max_memory='1KB' is too little: one block needs about .* lower batch_size$"):
        collect_statistics(str(folder), X, max_memory="1KB", **KW)
    collect_statistics(str(folder), X, max_memory=need, **KW)  # exactly enough (hidden states spill)
    with pytest.raises(ValueError, match=r"max_memory='lots': give a positive number of bytes"):
        collect_statistics(str(folder), X, max_memory="lots", **KW)
    with pytest.raises(ValueError, match=r"dtype='int8': give torch.bfloat16"):
        collect_statistics(str(folder), X, dtype="int8", **KW)
    with pytest.raises(ValueError, match=r"device='gpu!'"):
        collect_statistics(str(folder), X, device="gpu!", **KW)
    assert layerwise._parse_memory("20GB") == 20 * 10**9 and layerwise._parse_memory("1.5 GiB") == 3 * 2**29
    assert layerwise._parse_memory(None) > 0
