"""SlimDistillationTrainer on NaN/inf: `nonfinite_loss="error"` stops before the optimizer step, `"skip"` drops the
step; both with gradient accumulation and under 2-process DDP (this file is also the DDP script, see the bottom)."""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from _launch import launch_two_processes
from test_distillation import SEQ, _train, distill_args, tiny_student, tiny_tokenizer, train_teacher
from transformers import TrainerCallback

from hf_slim.data import packed_lm_dataset
from trainers.distillation_trainer import NonFiniteLossError, SlimDistillationTrainer


NAN = float("nan")


@pytest.fixture(scope="module")
def data():
    """tests/test_distillation.py's tiny pair: its tokenizer, packed text and a trained SlimMoe teacher."""
    texts, tokenizer = tiny_tokenizer()
    dataset = packed_lm_dataset(texts, tokenizer, SEQ)
    return tokenizer, dataset, train_teacher(dataset, len(tokenizer))


class Snapshots(TrainerCallback):
    """The student's parameters at the start (key 0) and after each optimizer step (key = global step)."""

    def __init__(self):
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def _take(self, state, model):
        self.at[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._take(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._take(state, model)


def nan_teacher_on_calls(trainer: SlimDistillationTrainer, calls: set[int]) -> None:
    """The teacher's hidden states become NaN on the given teacher calls (one call per training micro-batch)."""
    original, seen = trainer._teacher_hidden, []

    def hidden(inputs, want_mtp):
        h, mtp = original(inputs, want_mtp)
        seen.append(len(seen))
        return (torch.full_like(h, NAN) if seen[-1] in calls else h), mtp

    trainer._teacher_hidden = hidden


def nan_teacher(teacher):
    bad = copy.deepcopy(teacher)
    with torch.no_grad():
        bad.model.norm.weight[0] = NAN  # every position's final hidden state, hence all teacher logits, are NaN
    return bad


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def inner_optimizer(trainer):
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


# ---- config ------------------------------------------------------------------------------------------------------


def test_config_nonfinite_loss_default_and_validation(tmp_path):
    assert distill_args(tmp_path).nonfinite_loss == "error"
    assert distill_args(tmp_path, nonfinite_loss="skip").nonfinite_loss == "skip"
    with pytest.raises(ValueError, match=r"nonfinite_loss must be one of \('error', 'skip'\).*got 'ignore'"):
        distill_args(tmp_path, nonfinite_loss="ignore")


# ---- nonfinite_loss="error" (default) ------------------------------------------------------------------------------


def test_nan_teacher_weight_stops_before_the_optimizer_step(tmp_path, data):
    tokenizer, dataset, teacher = data
    student = tiny_student(len(tokenizer))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = _train(tmp_path, nan_teacher(teacher), tokenizer, dataset, student=student, max_steps=3)
    match = r"non-finite loss terms kd=nan, mtp_kd_1=nan.* at global step 0 "
    with pytest.raises(NonFiniteLossError, match=match) as info:
        trainer.train()
    error = info.value
    assert isinstance(error, FloatingPointError)
    assert error.step == 0
    # the teacher's NaN reaches the KD terms (and through them the total and the gradients), not the student-only ones
    assert error.terms == {"kd": "nan", "mtp_kd_1": "nan", "mtp_kd_2": "nan", "total": "nan", "gradients": "nan"}
    assert "nonfinite_loss='skip'" in str(error)
    # no optimizer step: the student is bitwise what it was, AdamW never initialised its state
    assert same(student.state_dict(), before)
    assert trainer.state.global_step == 0 and not inner_optimizer(trainer).state


def test_nan_in_one_micro_batch_of_a_later_step_under_gradient_accumulation(tmp_path, data):
    tokenizer, dataset, teacher = data
    trainer = _train(
        tmp_path, teacher, tokenizer, dataset, max_steps=4, per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )  # fmt: skip
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    nan_teacher_on_calls(trainer, {5})  # global step 2 = micro-batches 4 and 5: its second micro-batch only
    match = r"global step 2 \(2 micro-batch\(es\) accumulated for optimizer step 3\)"
    with pytest.raises(NonFiniteLossError, match=match) as info:
        trainer.train()
    assert info.value.step == 2 and {"kd", "total"} <= set(info.value.terms) and "lm" not in info.value.terms
    assert trainer.state.global_step == 2
    current = {n: p.detach() for n, p in trainer.model.named_parameters()}
    assert same(current, snapshots.at[2])  # the bad window's step was not applied
    assert not same(snapshots.at[2], snapshots.at[0])  # the two good steps were
    assert all(p.isfinite().all() for p in current.values())


def test_nonfinite_gradient_with_a_finite_loss_stops(tmp_path, data):
    tokenizer, dataset, teacher = data
    student = tiny_student(len(tokenizer))
    student.model.norm.weight.register_hook(lambda grad: grad * NAN)  # a NaN gradient, every loss term finite
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = _train(tmp_path, teacher, tokenizer, dataset, student=student, max_steps=2)
    match = r"non-finite gradients \(nan; every loss term is finite\) at global step 0"
    with pytest.raises(NonFiniteLossError, match=match) as info:
        trainer.train()
    assert info.value.terms == {"gradients": "nan"}
    assert same(student.state_dict(), before)


# ---- nonfinite_loss="skip" ---------------------------------------------------------------------------------------


def test_skip_with_every_batch_bad_finishes_with_the_initial_weights(tmp_path, data, caplog):
    tokenizer, dataset, teacher = data
    student = tiny_student(len(tokenizer))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = _train(
        tmp_path, nan_teacher(teacher), tokenizer, dataset, student=student, max_steps=3, nonfinite_loss="skip"
    )
    with caplog.at_level(logging.WARNING, logger="trainers.distillation_trainer"):
        trainer.train()
    assert trainer.state.global_step == 3 and trainer.nonfinite_skipped == 3
    assert [h["nonfinite_skipped"] for h in trainer.state.log_history if "kd" in h] == [1, 2, 3]
    assert trainer.state.log_history[-1]["nonfinite_skipped"] == 3  # the train() summary
    assert same(student.state_dict(), before)
    assert not inner_optimizer(trainer).state  # AdamW's moments and step count untouched
    warnings = [r.getMessage() for r in caplog.records if "skipped this optimizer step" in r.getMessage()]
    assert len(warnings) == 3 and "global step 2" in warnings[-1] and "kd=nan" in warnings[-1]


def test_skip_drops_only_the_bad_step_under_gradient_accumulation(tmp_path, data):
    tokenizer, dataset, teacher = data
    trainer = _train(
        tmp_path, teacher, tokenizer, dataset, max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, nonfinite_loss="skip",
    )  # fmt: skip
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    nan_teacher_on_calls(trainer, {2})  # global step 1 = micro-batches 2 and 3: its first micro-batch only
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.nonfinite_skipped == 1
    assert [h["nonfinite_skipped"] for h in trainer.state.log_history if "kd" in h] == [0, 1, 1]
    assert same(snapshots.at[2], snapshots.at[1])  # step 2 (the bad window) changed nothing
    assert not same(snapshots.at[1], snapshots.at[0]) and not same(snapshots.at[3], snapshots.at[2])
    assert all(p.isfinite().all() for p in snapshots.at[3].values())
    # AdamW stepped twice: the skipped step left its moments and step count alone
    steps = {float(s["step"]) for s in inner_optimizer(trainer).state.values()}
    assert steps == {2.0}


# ---- DDP: 2 CPU processes, a NaN on rank 1 only --------------------------------------------------------------------


def test_ddp_ranks_agree_to_stop_or_skip(tmp_path):
    results = launch_two_processes(Path(__file__), tmp_path, timeout=300)
    for mode in ("error", "skip"):
        assert results[0][mode]["world_size"] == 2
    # error: rank 0's own terms are finite, yet both ranks stop at the same step, naming rank 1's terms
    errors = [r["error"] for r in results]
    assert errors[0]["raised"] == errors[1]["raised"] == {"step": 1, "terms": errors[1]["raised"]["terms"]}
    assert {"kd", "total"} <= set(errors[0]["raised"]["terms"])
    assert errors[0]["global_step"] == errors[1]["global_step"] == 1
    assert errors[0]["checksums"]["final"] == errors[0]["checksums"]["1"] == errors[1]["checksums"]["final"]
    # skip: both ranks skip step 2 (global step 1), finish, and keep identical replicas
    skips = [r["skip"] for r in results]
    assert skips[0]["raised"] is None and skips[1]["raised"] is None
    assert skips[0]["skipped"] == skips[1]["skipped"] == 1 and skips[0]["global_step"] == 3
    assert skips[0]["checksums"] == skips[1]["checksums"]
    assert skips[0]["checksums"]["2"] == skips[0]["checksums"]["1"] != skips[0]["checksums"]["0"]
    assert skips[0]["checksums"]["3"] != skips[0]["checksums"]["2"]


def _ddp_main(out_dir: str) -> None:
    """Run under `accelerate launch` by `test_ddp_ranks_agree_to_stop_or_skip`: writes OUT_DIR/rank{r}.json."""
    torch.set_num_threads(1)
    texts, tokenizer = tiny_tokenizer()
    dataset = packed_lm_dataset(texts, tokenizer, SEQ).select(range(64))
    teacher = train_teacher(dataset, len(tokenizer), steps=3)
    result = {}
    for mode in ("error", "skip"):
        args = distill_args(
            Path(out_dir) / mode, max_steps=3, per_device_train_batch_size=2, ddp_backend="gloo", nonfinite_loss=mode
        )
        trainer = SlimDistillationTrainer(
            model=tiny_student(len(tokenizer)), teacher_model=teacher, args=args, train_dataset=dataset,
            processing_class=tokenizer,
        )  # fmt: skip
        original = trainer._teacher_hidden

        def hidden(inputs, want_mtp, original=original, trainer=trainer):
            h, mtp = original(inputs, want_mtp)
            if trainer.args.process_index == 1 and trainer.state.global_step == 1:
                h = torch.full_like(h, NAN)
            return h, mtp

        trainer._teacher_hidden = hidden
        snapshots = Snapshots()
        trainer.add_callback(snapshots)
        try:
            trainer.train()
            raised = None
        except NonFiniteLossError as error:
            raised = {"step": error.step, "terms": error.terms}

        def checksum(named):
            return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(named.values())))

        checksums = {str(step): checksum(named) for step, named in snapshots.at.items()}
        checksums["final"] = checksum({n: p.detach() for n, p in trainer.model.named_parameters()})
        result[mode] = {
            "world_size": args.world_size, "raised": raised, "global_step": trainer.state.global_step,
            "skipped": trainer.nonfinite_skipped, "checksums": checksums,
        }  # fmt: skip
    Path(out_dir, f"rank{args.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
    # Tear the gloo group down before the interpreter exits: left to process exit, its threads can abort the
    # process ("terminate called without an active exception") after the run itself succeeded.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
