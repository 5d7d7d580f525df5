"""What `SlimDistillationTrainer` leaves on disk (no pickled training arguments in a model folder,
`resume_from_checkpoint=True` past a checkpoint whose save was killed) and the training rows it refuses."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_distillation import SEQ, distill_args, tiny_student, tiny_tokenizer, train_teacher

from hf_slim.data import packed_lm_dataset
from trainers import SlimDistillationTrainer


@pytest.fixture(scope="module")
def data():
    texts, tokenizer = tiny_tokenizer()
    dataset = packed_lm_dataset(texts, tokenizer, SEQ).select(range(32))
    return tokenizer, dataset, train_teacher(dataset, len(tokenizer), steps=3)


def _trainer(out, data, **overrides):
    tokenizer, dataset, teacher = data
    return SlimDistillationTrainer(
        model=tiny_student(len(tokenizer)), teacher_model=teacher, train_dataset=dataset, processing_class=tokenizer,
        args=distill_args(out, **overrides),
    )  # fmt: skip


def test_model_folders_hold_the_arguments_as_json_and_no_pickle(tmp_path, data):
    trainer = _trainer(tmp_path / "run", data, max_steps=2, save_strategy="steps", save_steps=2, learning_rate=2e-3)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-2"):
        assert not (folder / "training_args.bin").exists()
        assert json.loads((folder / "training_args.json").read_text())["learning_rate"] == 2e-3
    pickles = [p.name for p in (tmp_path / "final").iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert pickles == []


@pytest.mark.parametrize("damage", ["no_state", "cut_state", "no_weights"])
def test_resume_true_skips_a_checkpoint_a_killed_save_left_incomplete(tmp_path, data, caplog, damage):
    settings = dict(max_steps=3, save_strategy="steps", save_steps=1)
    whole = _trainer(tmp_path / "whole", data, **settings)
    whole.train()
    run = tmp_path / "run"
    _trainer(run, data, **settings).train()
    last = run / "checkpoint-3"
    if damage == "no_state":
        (last / "trainer_state.json").unlink()
    elif damage == "cut_state":
        state = last / "trainer_state.json"
        state.write_text(state.read_text()[:40])
    else:
        (last / "model.safetensors").unlink()
    resumed = _trainer(run, data, **settings)
    with caplog.at_level(logging.WARNING, logger="trainers.checkpointing"):
        resumed.train(resume_from_checkpoint=True)
    assert f"Not resuming from {last}" in caplog.text
    assert resumed.state.global_step == 3
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # from checkpoint-2: bitwise the uninterrupted run


def test_resume_true_without_a_complete_checkpoint_says_so(tmp_path, data):
    (tmp_path / "run" / "checkpoint-1").mkdir(parents=True)
    with pytest.raises(ValueError, match="found no complete checkpoint-N folder in"):
        _trainer(tmp_path / "run", data, max_steps=1).train(resume_from_checkpoint=True)


@pytest.mark.parametrize("rows, overrides, match", [
    ([[1, 2, 3, 400, 5]] * 4, {}, r"train_dataset has token ids in \[1, 400\] but the student's embedding has 300 rows"),
    ([[1, 2, -3, 4]] * 4, {}, r"train_dataset has token ids in \[-3, 4\]"),
    ([], {}, "train_dataset has no rows; give a dataset"),
    ([[]] * 4, {}, "train_dataset has no rows after TRL's preparation"),
    ([[1, 2, 3]] * 4, {"max_length": 0}, "max_length must be None or an int >= 2"),
    ([[1, 2, 3]] * 4, {"max_length": -5}, "max_length must be None or an int >= 2"),
])  # fmt: skip
def test_bad_training_rows_are_refused_before_any_step(tmp_path, data, rows, overrides, match):
    from datasets import Dataset

    tokenizer, _, teacher = data
    with pytest.raises(ValueError, match=match):
        SlimDistillationTrainer(
            model=tiny_student(len(tokenizer)), teacher_model=teacher, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"input_ids": rows}), args=distill_args(tmp_path, **overrides),
        )  # fmt: skip


def test_a_stage_folder_is_written_atomically(tmp_path, data, monkeypatch):
    """hf-slim distill's stage folders: a save that fails (a full disk) leaves the stage folder as it was, with the
    stage run's checkpoints, and no half-written model."""
    import errno

    from trainers.progressive import _save_stage

    trainer = _trainer(tmp_path / "stage-1", data, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    real = type(trainer).save_model

    def full_disk(self, output_dir=None, _internal_call=False):
        real(self, output_dir, _internal_call)
        raise OSError(errno.ENOSPC, "No space left on device")

    before = sorted(p.name for p in (tmp_path / "stage-1").iterdir())
    assert "checkpoint-2" in before and "model.safetensors" not in before
    monkeypatch.setattr(type(trainer), "save_model", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _save_stage(trainer, tmp_path / "stage-1")
    assert sorted(p.name for p in (tmp_path / "stage-1").iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    _save_stage(trainer, tmp_path / "stage-1")
    names = {p.name for p in (tmp_path / "stage-1").iterdir()}
    assert {"checkpoint-1", "checkpoint-2", "config.json", "model.safetensors", "training_args.json"} <= names
