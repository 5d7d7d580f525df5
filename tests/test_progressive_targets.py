"""`ProgressivePlan` stage targets (`hf-slim distill` and `ProgressivePlan.run`): a size at or above the model's size
when the stage starts is refused (it used to be turned into "keep" silently), from the configs alone, before any
weights or data are loaded."""

from __future__ import annotations

import os
import sys

import pytest
from transformers import AutoConfig

sys.path.insert(0, os.path.dirname(__file__))
from test_anatomy import FAMILY_KWARGS, tiny_model  # noqa: E402

import hf_slim  # noqa: E402, F401  (registers slim_moe with the Auto classes)
from hf_slim.pruning import ProgressivePlan, PruneConfig, prune_progressively  # noqa: E402


def tiny_config(family: str = "qwen3_moe", **overrides):
    """Config of the tiny test models (4 layers, hidden 32, 4 heads / 2 KV heads, 8 experts, top-2)."""
    kwargs = dict(FAMILY_KWARGS[family], **overrides)
    return AutoConfig.for_model(kwargs.pop("model_type", family), **kwargs)


def plan(*stages: dict) -> ProgressivePlan:
    return ProgressivePlan(stages=[PruneConfig.from_dict(s) for s in stages])


@pytest.mark.parametrize(
    "stages, match",
    [
        ([{"num_experts": 100}],
         r"^stages\[0\] \(stage 1\): num_experts=100 is not smaller than the current model's num_experts=8; "
         r".*strictly smaller .*omit the field to keep it"),
        ([{"num_experts": 8}], r"^stages\[0\] \(stage 1\): num_experts=8 .* num_experts=8"),
        ([{"num_experts_per_tok": 2}], r"stage 1\): num_experts_per_tok=2 .* num_experts_per_tok=2"),
        ([{"hidden_size": 1.0}], r"stage 1\): hidden_size=1.0 \(= 32 of the original model's 32\) .* hidden_size=32"),
        ([{"num_experts": 4}, {"num_experts": 6}],
         r"^stages\[1\] \(stage 2\): num_experts=6 is not smaller than the current model's num_experts=4"),
        ([{"num_hidden_layers": 0.75}, {"num_hidden_layers": 0.75, "num_experts": 0.5}],
         r"^stages\[1\] \(stage 2\): num_hidden_layers=0.75 \(= 3 of the original model's 4\) .* "
         r"num_hidden_layers=3"),
        ([{}, {"moe_intermediate_size": 32}], r"stage 2\): moe_intermediate_size=32 .* moe_intermediate_size=16"),
    ],
)  # fmt: skip
def test_stage_target_not_below_current_size_is_refused(stages, match):
    with pytest.raises(ValueError, match=match):
        plan(*stages).check(tiny_config())


def test_refusal_uses_canonical_names_on_every_family():
    # Mixtral spells the expert count num_local_experts; the message keeps the name the stage used
    with pytest.raises(ValueError, match=r"stage 1\): num_experts=8 .* num_experts=8"):
        plan({"num_experts": 8}).check(tiny_config("mixtral"))
    # the SlimMoe student of stage 2 (stock teacher converted) is read with its own spec
    teacher = tiny_config("mixtral")
    with pytest.raises(ValueError, match=r"stage 1\): num_experts=4 .* num_experts=4"):
        plan({"num_experts": 4}).resolve_stage(0, teacher, tiny_config("slim_moe", num_experts=4))


def test_valid_stages_resolve_to_absolute_sizes():
    teacher = tiny_config()
    first, second = plan(
        {"num_hidden_layers": 3}, {"num_hidden_layers": 2, "hidden_size": 24, "num_experts": 0.5}
    ).check(teacher)
    assert first.num_hidden_layers == 3 and first.num_experts is None
    assert (second.num_hidden_layers, second.hidden_size, second.num_experts) == (2, 24, 4)
    assert plan({}).check(teacher)[0].is_noop
    # a separate student: sizes are compared with the student, fractions still taken of the teacher
    student = tiny_config(num_experts=4)
    with pytest.raises(ValueError, match=r"stage 1\): num_experts=0.5 \(= 4 of the original model's 8\) .*=4"):
        plan({"num_experts": 0.5}).check(teacher, student)
    assert plan({"num_experts": 0.25}).check(teacher, student)[0].num_experts == 2
    # run time: the same rule against the model the stage actually starts from
    assert plan({"num_experts": 2}).resolve_stage(0, teacher, student).num_experts == 2
    # callers name their stage list in the messages (a distillation config calls it prune_stages)
    with pytest.raises(ValueError, match=r"^prune_stages\[0\] \(stage 1\): num_experts=4 "):
        plan({"num_experts": 4}).resolve_stage(0, teacher, student, label="prune_stages")
    with pytest.raises(ValueError, match=r"^prune_stages\[0\] \(stage 1\): num_experts=4 "):
        plan({"num_experts": 4}).check(teacher, student, label="prune_stages")


def test_fraction_of_a_size_the_teacher_lacks_names_the_stage():
    with pytest.raises(ValueError, match=r"stage 1\): shared_expert_intermediate_size=0.5 is a fraction"):
        plan({"shared_expert_intermediate_size": 0.5}).check(tiny_config())


def test_plan_run_refuses_an_impossible_stage_before_calibrating():
    """`ProgressivePlan.run` applies the same rule (one resolver), checking every stage before the first one runs."""

    def calibrate(model):
        raise AssertionError("calibrated before the stages were checked")

    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match=r"^stages\[1\] \(stage 2\): num_experts=100 .* num_experts=8"):
        plan({"num_hidden_layers": 3}, {"num_experts": 100}).run(model, calibrate)
    with pytest.raises(ValueError, match=r"^stages\[0\] \(stage 1\): num_experts_per_tok=2 "):
        plan({"num_experts_per_tok": 2}).run(model, calibrate)


def test_one_loop_behind_plan_run_and_hf_slim_distill():
    """`prune_progressively` hands each pruned model and its resolved stage to `after_stage` (after the last stage
    only when asked, as `hf-slim distill` does); `ProgressivePlan.run` is that loop with `recover(model, index)`."""
    stages, calls = plan({"num_hidden_layers": 3}, {}, {"num_hidden_layers": 0.5}), []

    def after_stage(model, index, stage):
        calls.append((index, model.config.num_hidden_layers, stage.num_hidden_layers))
        return model

    out = prune_progressively(tiny_model("qwen3_moe"), stages, lambda m: None, after_stage, after_last_stage=True)
    assert calls == [(0, 3, 3), (1, 3, None), (2, 2, 2)] and out.config.num_hidden_layers == 2
    recovered = []
    out = stages.run(tiny_model("qwen3_moe"), lambda m: None, lambda m, i: recovered.append(i) or m)
    assert recovered == [0, 1] and out.config.num_hidden_layers == 2


def test_pruning_modules_import_no_circle():
    """The plan and its loop live beside `prune`, not in `config.py`, which `prune.py` imports: no import circle in
    `hf_slim.pruning`, counting imports inside functions."""
    import ast
    from pathlib import Path

    folder = Path(hf_slim.__file__).parent / "pruning"
    edges = {}
    for path in folder.glob("*.py"):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                targets |= {n.split(".")[0] for n in names if (folder / f"{n.split('.')[0]}.py").exists()}
        edges[path.stem] = targets - {path.stem}

    def reaches(start, goal, seen=()):
        return any(t == goal or (t not in seen and reaches(t, goal, (*seen, t))) for t in edges.get(start, ()))

    circles = sorted(m for m in edges if m != "__init__" and reaches(m, m))
    assert not circles, {m: sorted(edges[m]) for m in circles}


def test_depth_first_cuts_at_least_one_layer_per_stage():
    final = PruneConfig(num_hidden_layers=5, num_experts=4)
    # a rounded share of 0 or of the whole cut is moved to 1 / cut - 1 layers, so both stages cut
    def first_stage(layers, share=0.5):
        return ProgressivePlan.depth_first(final, num_source_layers=layers, first_stage_share=share).stages[0]

    assert first_stage(7, 0.1).num_hidden_layers == 6 and first_stage(7, 0.9).num_hidden_layers == 6
    assert first_stage(9).num_hidden_layers == 7 and first_stage(9).num_experts is None
    ProgressivePlan.depth_first(final, num_source_layers=7).check(tiny_config(num_hidden_layers=7))
    with pytest.raises(ValueError, match="cut of one layer"):
        ProgressivePlan.depth_first(final, num_source_layers=6)
    with pytest.raises(ValueError, match="not smaller than num_source_layers=5"):
        ProgressivePlan.depth_first(final, num_source_layers=5)
    with pytest.raises(ValueError, match="no depth cut"):
        ProgressivePlan.depth_first(PruneConfig(num_hidden_layers=1.0))


def test_cli_prints_one_line_and_exits_nonzero_before_loading_weights_or_data(tmp_path, capsys, monkeypatch):
    """`hf-slim distill` with `num_experts: 100` on an 8-expert teacher: one error line on stderr, exit code 2, no
    traceback. Only the teacher's config.json exists, and data loading is booby-trapped: the check runs first."""
    from hf_slim.cli import main
    from trainers import progressive

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the stage targets were checked")

    monkeypatch.setattr(progressive, "_load_dataset", no_data)
    tiny_config().save_pretrained(tmp_path / "teacher")
    config = tmp_path / "distill.yaml"
    config.write_text(
        f"""
teacher_model_name_or_path: {tmp_path / "teacher"}
dataset_name: hf_slim:stdlib
prune_stages:
  - {{num_hidden_layers: 3}}
  - {{num_experts: 100}}
stage_tokens: [256, 256]
output_dir: {tmp_path / "run"}
max_length: 32
use_cpu: true
bf16: false
report_to: []
"""
    )
    assert main(["distill", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith("hf-slim distill: error: prune_stages[1] (stage 2): num_experts=100 ")
    assert "current model's num_experts=8" in lines[0]
    assert not (tmp_path / "run").exists()
