"""An offline teacher: `write_teacher_logits` / `hf-slim teacher-logits` and training from the folder
(`SlimDistillationConfig.teacher_logits_dir`), checked against the stock forward and against online top-k training."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from datasets import Dataset
from test_distillation import SEQ, distill_args, tiny_student, tiny_tokenizer, train_teacher

from hf_slim.cli import main
from hf_slim.data import packed_lm_dataset
from hf_slim.teacher_logits import META_FILE, TeacherLogitsReader, write_teacher_logits
from hf_slim.teacher_logits import writer as writer_module
from trainers import SlimDistillationTrainer

K = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    texts, tokenizer = tiny_tokenizer()
    packed = packed_lm_dataset(texts, tokenizer, SEQ).select(range(40))
    teacher = train_teacher(packed, len(tokenizer), steps=5)
    # ragged rows (different lengths, so batches are padded) with a completion-style label mask on some
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(24):
        ids = packed[i]["input_ids"][: int(torch.randint(5, SEQ + 1, (1,), generator=generator))]
        labels = [-100] * (len(ids) // 3) + ids[len(ids) // 3 :] if i % 2 else list(ids)
        rows.append({"input_ids": ids, "labels": labels})
    ragged = Dataset.from_list(rows)
    folder = tmp_path_factory.mktemp("logits") / "ragged"
    write_teacher_logits(teacher, ragged, folder, tokenizer=tokenizer, top_k=K, max_length=SEQ, batch_size=5,
                         max_shard_size="8KB", progress=False)  # fmt: skip
    return tokenizer, teacher, packed, ragged, folder


def _write(teacher, dataset, folder, tokenizer, **kwargs):
    options = dict(tokenizer=tokenizer, top_k=K, max_length=SEQ, batch_size=4, progress=False)
    options.update(kwargs)
    return write_teacher_logits(teacher, dataset, folder, **options)


# ---- the folder -------------------------------------------------------------------------------------------------


def test_stored_top_k_is_the_stock_forward_s(setup):
    tokenizer, teacher, _, ragged, folder = setup
    reader = TeacherLogitsReader(folder)
    assert (reader.num_rows, reader.top_k, reader.max_length, reader.vocab_size) == (24, K, SEQ, len(tokenizer))
    assert len(reader.shards) > 2  # 8KB shards: several
    for r in (0, 7, 23):
        row = reader.row(r)
        assert row.input_ids.tolist() == ragged[r]["input_ids"] and row.labels.tolist() == ragged[r]["labels"]
        with torch.no_grad():  # the stock forward, full logits: what the writer must not need
            log_probs = torch.log_softmax(teacher(input_ids=row.input_ids[None]).logits[0].float(), dim=-1)
        values, ids = log_probs.topk(K, dim=-1)
        torch.testing.assert_close(row.log_probs, values, atol=1e-5, rtol=0)
        assert torch.equal(row.token_ids.long(), ids)
        rest = torch.log1p(-values.exp().sum(-1))  # top k + rest = 1
        torch.testing.assert_close(row.rest_log_prob, rest, atol=1e-5, rtol=1e-4)


def test_dataset_columns_and_half_precision_log_probs(setup, tmp_path):
    tokenizer, teacher, packed, _, folder = setup
    dataset = TeacherLogitsReader(folder).dataset()
    assert dataset.column_names == ["input_ids", "labels", "teacher_row"] and dataset["teacher_row"] == list(range(24))
    half = _write(teacher, packed.select(range(6)), tmp_path / "bf16", tokenizer, log_prob_dtype="bfloat16", top_k=4)
    full = _write(teacher, packed.select(range(6)), tmp_path / "fp32", tokenizer, top_k=4)
    assert half.row(2).log_probs.dtype == torch.bfloat16 and "labels" not in half.dataset().column_names
    torch.testing.assert_close(half.row(2).log_probs.float(), full.row(2).log_probs, atol=0.05, rtol=0.01)
    sizes = [sum(s["bytes"] for s in r.shards) for r in (half, full)]
    assert sizes[0] < sizes[1]


def test_a_killed_write_resumes_to_the_same_bytes(setup, tmp_path, monkeypatch):
    tokenizer, teacher, packed, _, _ = setup
    rows = packed.select(range(20))
    whole = _write(teacher, rows, tmp_path / "whole", tokenizer, max_shard_size="6KB")
    calls = {"n": 0}
    real = writer_module._teacher_top_k

    def dies_after_three_batches(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "_teacher_top_k", dies_after_three_batches)
    with pytest.raises(KeyboardInterrupt):
        _write(teacher, rows, tmp_path / "resumed", tokenizer, max_shard_size="6KB")
    meta = json.loads((tmp_path / "resumed" / META_FILE).read_text())
    assert not meta["complete"] and 0 < len(meta["shards"])
    (tmp_path / "resumed" / "logits-00099.safetensors.tmp-1").write_bytes(b"half")  # a killed run's temporary
    with pytest.raises(ValueError, match="is not finished"):
        TeacherLogitsReader(tmp_path / "resumed")
    monkeypatch.setattr(writer_module, "_teacher_top_k", real)
    resumed = _write(teacher, rows, tmp_path / "resumed", tokenizer, max_shard_size="6KB")
    assert not list((tmp_path / "resumed").glob("*.tmp-*"))
    assert [s["file"] for s in resumed.shards] == [s["file"] for s in whole.shards]
    for a, b in zip(resumed.shards, whole.shards):
        assert (tmp_path / "resumed" / a["file"]).read_bytes() == (tmp_path / "whole" / b["file"]).read_bytes()


def test_resume_refuses_other_settings_or_other_rows(setup, tmp_path, monkeypatch):
    tokenizer, teacher, packed, _, _ = setup
    monkeypatch.setattr(writer_module, "_teacher_top_k", _dies_after(writer_module._teacher_top_k, 2))
    with pytest.raises(KeyboardInterrupt):
        _write(teacher, packed.select(range(12)), tmp_path / "out", tokenizer, max_shard_size="4KB")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="top_k is 12 but this run's is 8"):
        _write(teacher, packed.select(range(12)), tmp_path / "out", tokenizer, top_k=8)
    with pytest.raises(ValueError, match="was written from other rows"):
        _write(teacher, packed.select(range(12, 24)), tmp_path / "out", tokenizer, max_shard_size="4KB")
    fresh = _write(teacher, packed.select(range(12, 24)), tmp_path / "out", tokenizer, overwrite=True)
    assert fresh.num_rows == 12


def _dies_after(real, n):
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapped


def test_bad_folders_name_the_file(setup, tmp_path):
    tokenizer, teacher, packed, _, folder = setup
    with pytest.raises(ValueError, match="does not exist"):
        TeacherLogitsReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no teacher_logits.json"):
        TeacherLogitsReader(tmp_path / "empty")
    reader = _write(teacher, packed.select(range(8)), tmp_path / "copy", tokenizer, max_shard_size="4KB")
    last = tmp_path / "copy" / reader.shards[-1]["file"]
    last.write_bytes(last.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"shard {last} has .* bytes.*truncated"):
        TeacherLogitsReader(tmp_path / "copy")
    last.unlink()
    with pytest.raises(ValueError, match=f"shard {last.name} of .* is missing"):
        TeacherLogitsReader(tmp_path / "copy")
    good = TeacherLogitsReader(folder)
    with pytest.raises(ValueError, match="max_length is 32 but the run's max_length is 64"):
        good.check_compatible(max_length=64)
    with pytest.raises(ValueError, match="vocab_size is 300 but the student's lm_head has 512 rows"):
        good.check_compatible(vocab_size=512)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<new_token>"])
    with pytest.raises(ValueError, match="tokenizer_fingerprint is .* the token ids mean other tokens"):
        good.check_compatible(tokenizer=other)
    with pytest.raises(ValueError, match="top_k must be between 1 and the teacher's vocabulary size 300"):
        _write(teacher, packed, tmp_path / "big_k", tokenizer, top_k=301)
    with pytest.raises(ValueError, match="row 0 has columns"):
        _write(teacher, Dataset.from_dict({"other": ["x"]}), tmp_path / "cols", tokenizer)


# ---- training from the folder -------------------------------------------------------------------------------------


def _history(trainer, keys=("loss", "lm", "kd", "mtp_lm", "mtp_kd")):
    return [[h[k] for k in keys] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(temperature=2.0, divergence="jsd", jsd_beta=0.3, per_device_train_batch_size=3, gradient_accumulation_steps=2),
])  # fmt: skip
def test_offline_training_equals_online_top_k_step_for_step(setup, tmp_path, overrides):
    """The same student trained from the folder and from the live teacher with teacher_top_k=k: the same loss terms
    (main KD and MTP-KD of 2 depths) at every step and the same parameters after it."""
    tokenizer, teacher, _, _, folder = setup
    offline_student = tiny_student(len(tokenizer))
    online_student = copy.deepcopy(offline_student)
    settings = dict(max_steps=4, lambda_start=0.8, lambda_end=0.5, **overrides)
    offline = SlimDistillationTrainer(
        model=offline_student, processing_class=tokenizer,
        args=distill_args(tmp_path / "offline", teacher_logits_dir=str(folder), **settings),
    )  # fmt: skip
    offline.train()
    rows = TeacherLogitsReader(folder).dataset().remove_columns("teacher_row")
    online = SlimDistillationTrainer(
        model=online_student, teacher_model=teacher, train_dataset=rows, processing_class=tokenizer,
        args=distill_args(tmp_path / "online", teacher_top_k=K, **settings),
    )  # fmt: skip
    online.train()
    assert len(_history(offline)) == 4
    torch.testing.assert_close(torch.tensor(_history(offline)), torch.tensor(_history(online)), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(offline_student.named_parameters(), online_student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)
    mass = [h["teacher_top_k_mass"] for h in offline.state.log_history if "teacher_top_k_mass" in h]
    assert mass and all(0 < m < 1 for m in mass)


def test_fewer_tokens_than_stored_and_evaluation(setup, tmp_path):
    tokenizer, teacher, packed, _, folder = setup
    eval_folder = _write(teacher, packed.select(range(30, 38)), tmp_path / "eval", tokenizer).folder
    trainer = SlimDistillationTrainer(
        model=tiny_student(len(tokenizer)), processing_class=tokenizer,
        args=distill_args(tmp_path / "run", teacher_logits_dir=str(folder), eval_teacher_logits_dir=str(eval_folder),
                          teacher_top_k=4, max_steps=2),
    )  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_kd", "eval_mtp_kd", "eval_teacher_top_k_mass"} <= set(metrics)
    with pytest.raises(ValueError, match="teacher_top_k=20 is more than the 12 tokens per position"):
        SlimDistillationTrainer(
            model=tiny_student(len(tokenizer)), processing_class=tokenizer,
            args=distill_args(tmp_path / "run2", teacher_logits_dir=str(folder), teacher_top_k=20, max_steps=1),
        ).train()


@pytest.mark.parametrize("overrides, match", [
    (dict(packing=True), "packing=True cannot be used with teacher_logits_dir"),
    (dict(divergence="reverse_kl"), "divergence='reverse_kl' cannot be used with teacher_logits_dir"),
    (dict(mtp_kd_target="teacher_mtp"), "mtp_kd_target='teacher_mtp' needs the teacher's MTP heads"),
    (dict(teacher_model_name_or_path="x"), "teacher_model_name_or_path is set"),
    (dict(teacher_logits_dir=None, eval_teacher_logits_dir="x"), "eval_teacher_logits_dir='x' is set but"),
])  # fmt: skip
def test_config_refuses_what_a_folder_cannot_give(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        distill_args(tmp_path, **{"teacher_logits_dir": str(tmp_path), **overrides})


def test_trainer_refuses_a_teacher_or_a_dataset_beside_the_folder(setup, tmp_path):
    tokenizer, teacher, packed, _, folder = setup
    args = distill_args(tmp_path / "run", teacher_logits_dir=str(folder))
    student = tiny_student(len(tokenizer))
    with pytest.raises(ValueError, match="teacher_model is given but teacher_logits_dir"):
        SlimDistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer)
    with pytest.raises(ValueError, match="train_dataset must be None with teacher_logits_dir"):
        SlimDistillationTrainer(model=student, args=args, train_dataset=packed, processing_class=tokenizer)
    with pytest.raises(ValueError, match="max_length is 32 but the run's max_length is 16"):
        SlimDistillationTrainer(model=student, args=distill_args(tmp_path / "r", teacher_logits_dir=str(folder),
                                                                 max_length=16), processing_class=tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match="vocab_size is 300 but the student's lm_head has 320 rows"):
        SlimDistillationTrainer(model=tiny_student(320), args=args, processing_class=tokenizer)


@pytest.mark.parametrize("kind, agreement", [("4bit", 0.5), ("8bit", 0.9)])
def test_quantized_teacher(setup, tmp_path, kind, agreement):
    """A bitsandbytes teacher (the trainer's own loader and 4bit CPU fix): its top-1 agrees with the full-precision
    teacher's at most positions (NF4 at hidden 32 is coarse)."""
    from transformers import AutoModelForCausalLM

    from trainers.teacher import teacher_quantization_config

    tokenizer, teacher, packed, _, _ = setup
    teacher.save_pretrained(tmp_path / "teacher")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "teacher", quantization_config=teacher_quantization_config(kind)
    )
    rows = packed.select(range(6))
    full = _write(teacher, rows, tmp_path / "full", tokenizer)
    low = _write(quantized, rows, tmp_path / kind, tokenizer)
    same = torch.cat([full.row(r).token_ids[:, 0] == low.row(r).token_ids[:, 0] for r in range(6)]).float().mean()
    assert same >= agreement and torch.isfinite(low.row(0).log_probs).all()


# ---- the command line -----------------------------------------------------------------------------------------------


def test_cli_writes_a_folder_and_reports_bad_input_in_one_line(setup, tmp_path, capsys):
    tokenizer, teacher, _, _, _ = setup
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(10)))
    out = tmp_path / "logits"
    argv = ["teacher-logits", str(tmp_path / "teacher"), str(data), str(out), "--top-k", "5", "--max-length", "16"]
    assert main(argv) == 0
    reader = TeacherLogitsReader(out)
    assert (reader.num_rows, reader.top_k) == (10, 5)
    assert reader.row(3).input_ids.tolist() == tokenizer(f"def f3(x):\n    return x + 3\n{tokenizer.eos_token}")[
        "input_ids"
    ][:16]
    assert "bytes per token" in capsys.readouterr().out
    # one decoder block at a time from the saved teacher: the same numbers
    assert main([*argv[:3], str(tmp_path / "layerwise"), *argv[4:], "--layerwise", "--rows-per-pass", "4"]) == 0
    layerwise = TeacherLogitsReader(tmp_path / "layerwise")
    for r in range(10):
        assert torch.equal(layerwise.row(r).log_probs, reader.row(r).log_probs)
    capsys.readouterr()
    assert main([*argv, "--rows-per-pass", "4"]) == 2
    assert "apply to a --layerwise teacher only" in capsys.readouterr().err
    assert main([*argv[:-4], "--top-k", "6", "--max-length", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "top_k is 5 but this run's is 6" in err[0] and "--overwrite" in err[0]
    (tmp_path / "no_tokenizer").mkdir()
    teacher.save_pretrained(tmp_path / "no_tokenizer")
    assert main(["teacher-logits", str(tmp_path / "no_tokenizer"), str(data), str(tmp_path / "x")]) == 2
    assert "has no tokenizer files (tokenizer.json / tokenizer_config.json)" in capsys.readouterr().err
    assert main([*argv, "--dtype", "int8"]) == 2
    assert "--dtype must be auto, float32, bfloat16 or float16" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
