"""`hf-slim prune` on the bounded path: bad checkpoints, too little memory, a full disk, budgets and dtypes, each as
the CLI reports it (one line, exit code 2, nothing left on disk)."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors import safe_open
from test_anatomy import real_text, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast

from hf_slim.checkpoints import writer as writer_module
from hf_slim.cli import main
from hf_slim.utils import count_parameters


def _error_line(capsys, argv):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    # progress bars may come first (stderr, as tqdm writes them); the error is one line, the last
    lines = [line for line in captured.err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("hf-slim prune: error: ")]
    assert errors == lines[-1:], captured.err
    return errors[0][len("hf-slim prune: error: ") :]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Qwen3-MoE in three shards, with a byte-level tokenizer and a calibration text."""
    folder = tmp_path_factory.mktemp("prune_cli") / "src"
    tiny_model("qwen3_moe").save_pretrained(folder, max_shard_size="40KB")
    vocab = {chr(i): i for i in range(160)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0)).save_pretrained(folder)
    (folder.parent / "calib.txt").write_text("\n\n".join(real_text()))
    return folder


def _copy(source, tmp_path):
    import shutil

    return shutil.copytree(source, tmp_path / "src")


def _shards(folder):
    return sorted(folder.glob("model-*.safetensors"))


def _leftovers(tmp_path):
    """Everything in tmp_path besides the source: the output, temporary or calibration folders."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "src")


def test_prune_cli_refuses_a_missing_shard(source, tmp_path, capsys):
    src = _copy(source, tmp_path)
    missing = _shards(src)[1]
    missing.unlink()
    message = _error_line(capsys, ["prune", str(src), str(tmp_path / "out"), "--num-experts", "2"])
    assert missing.name in message
    assert _leftovers(tmp_path) == []


def test_prune_cli_refuses_a_truncated_shard(source, tmp_path, capsys):
    src = _copy(source, tmp_path)
    shard = _shards(src)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    message = _error_line(capsys, ["prune", str(src), str(tmp_path / "out"), "--num-experts", "2"])
    assert shard.name in message
    assert _leftovers(tmp_path) == []


def test_prune_cli_says_how_much_memory_one_block_needs(source, tmp_path, capsys):
    calib = source.parent / "calib.txt"
    argv = ["prune", str(source), str(tmp_path / "out"), "--num-experts", "2", "--calibration", str(calib),
            "--num-samples", "4", "--max-length", "32", "--max-memory", "10KB"]  # fmt: skip
    message = _error_line(capsys, argv)
    assert message.startswith("max_memory='10KB' is too little: one block needs about ")
    assert _leftovers(tmp_path) == []


def test_prune_cli_on_a_full_disk_leaves_nothing(source, tmp_path, capsys, monkeypatch):
    def no_space(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(writer_module._Shard, "write", no_space)
    message = _error_line(capsys, ["prune", str(source), str(tmp_path / "out"), "--num-hidden-layers", "1"])
    assert "No space left on device" in message
    assert _leftovers(tmp_path) == []


def test_prune_cli_to_a_budget_in_bfloat16(source, tmp_path, capsys):
    calib = source.parent / "calib.txt"
    argv = ["prune", str(source), str(tmp_path / "out"), "--target-total-params", "0.6", "--calibration", str(calib),
            "--num-samples", "4", "--max-length", "32", "--dtype", "bfloat16"]  # fmt: skip
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "sizes chosen for the budget" in shown and "wrote" in shown
    config = AutoConfig.from_pretrained(tmp_path / "out")
    record = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    assert record["prune_config"]["target_total_params"] == "0.6"
    chosen = record["report"]["targets"]
    assert chosen and all(getattr(config, k) == v for k, v in chosen.items() if k != "num_experts_per_tok")
    assert record["after"]["total_params"] <= 0.6 * record["before"]["total_params"]
    with safe_open(str(next((tmp_path / "out").glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert _leftovers(tmp_path) == ["out"]  # the calibration work folder is gone


def test_prune_cli_output_counts_match_a_loaded_model(source, tmp_path, capsys):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    src = _copy(source, tmp_path)  # a local copy of a Hub model: its config names it, its card has the licence
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "_name_or_path": "Qwen/Qwen3-30B-A3B"}))
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Qwen3-30B-A3B\n")
    assert main(["prune", str(src), str(tmp_path / "out"), "--num-hidden-layers", "1"]) == 0
    record = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    counts = count_parameters(model)
    assert (record["after"]["total_params"], record["after"]["active_params"]) == (counts["total"], counts["active"])
    data = ModelCard.load(tmp_path / "out" / "README.md").data
    assert (data.base_model, data.base_model_relation, data.license) == ("Qwen/Qwen3-30B-A3B", "finetune", "apache-2.0")
    assert data.datasets is None and data.eval_results is None  # no calibration data, nothing measured


def test_prune_cli_continues_a_killed_calibration(source, tmp_path, capsys, monkeypatch):
    """Ctrl-C inside the second decoder block; the same command again resumes after the first block."""
    from hf_slim.pruning import layerwise

    calib = source.parent / "calib.txt"
    argv = ["prune", str(source), str(tmp_path / "out"), "--num-experts", "2", "--calibration", str(calib),
            "--num-samples", "4", "--max-length", "32"]  # fmt: skip
    steps: list[str] = []
    run_step = layerwise._Run.run_step

    def interrupted_in_block_1(self, step):
        steps.append(self.steps[step][0])
        if self.steps[step][0] == "model.layers.1" and len(steps) < 10:
            raise KeyboardInterrupt
        return run_step(self, step)

    monkeypatch.setattr(layerwise._Run, "run_step", interrupted_in_block_1)
    assert main(argv) == 130
    assert _leftovers(tmp_path) == [".out.calibration"]  # the finished blocks, kept for the next run
    first = list(steps)
    steps.clear()
    steps.extend(["-"] * 10)  # the second run is not interrupted
    assert main(argv) == 0
    assert first == ["embeddings", "model.layers.0", "model.layers.1"]
    assert steps[10] == "model.layers.1"  # resumed: neither the embeddings nor block 0 again
    assert _leftovers(tmp_path) == ["out"]
