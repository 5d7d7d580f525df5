"""`hf-slim distill`: TrlParser (YAML + `--field value` overrides), the whole configuration checked before any data or
weights load (β against the student's MTP heads, offline teachers refused), the stage plan and results tables, and
the loss-curve figure. The two-stage SlimMoe run is tests/test_distillation.py::test_progressive_distill_cli_two_stages.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_slim.cli import build_parser, main
from hf_slim.data import stdlib_corpus, train_tokenizer
from trainers import progressive
from trainers.progressive import StageResult, _loss_plot, load_distill_config, plan_distill

TRAINING = """
dataset_name: hf_slim:stdlib
calibration_samples: 4
max_length: 32
per_device_train_batch_size: 2
logging_steps: 1
learning_rate: 1e-3
bf16: false
use_cpu: true
activation_checkpointing: false
report_to: []
save_strategy: "no"
disable_tqdm: true
"""


@pytest.fixture(scope="module")
def stock_teacher(tmp_path_factory):
    """A tiny stock Qwen3-MoE (2 layers, 4 experts, no MTP heads) and its tokenizer, saved as `hf-slim prune` would."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = train_tokenizer(stdlib_corpus(max_documents=200), vocab_size=300)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    Qwen3MoeForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_config(path: Path, teacher: Path, extra: str = "") -> Path:
    path.write_text(
        f"teacher_model_name_or_path: {teacher}\noutput_dir: {path.parent / 'run'}\n"
        "prune_stages:\n  - {num_hidden_layers: 1}\n  - {num_experts: 2}\nstage_tokens: [64, 64]\n"
        + TRAINING + extra
    )
    return path


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a run gets as far as the teacher's weights or the data."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded weights or data before the configuration was checked")

    monkeypatch.setattr(progressive, "load_teacher", refuse)
    monkeypatch.setattr(progressive, "_load_dataset", refuse)


def error_line(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-slim distill: error: "), captured.err
    return lines[0]


# ---- parsing: TrlParser, YAML + overrides ----------------------------------------------------------------------------
def test_overrides_on_top_of_the_yaml_in_both_spellings(tmp_path, stock_teacher):
    config = write_config(tmp_path / "d.yaml", stock_teacher, "env:\n  HF_SLIM_TEST_ENV: from-yaml\n")
    script_args, args = load_distill_config(config)
    # TrlParser converts YAML strings with the field's type ("1e-3" is a str to YAML) and sets `env:`
    assert args.learning_rate == 1e-3 and script_args.stage_tokens == [64, 64]
    import os

    assert os.environ.pop("HF_SLIM_TEST_ENV") == "from-yaml"
    parser = build_parser()
    for argv in (
        ["distill", "--config", str(config), "--learning_rate", "1e-4", "--stage_tokens", "32", "96", "--bf16", "false"],
        ["distill", str(config), "--learning_rate=1e-4", "--stage-tokens", "32", "96", "--no_remove_unused_columns"],
    ):
        parsed = parser.parse_args(argv)
        script_args, args = load_distill_config(parsed.config_option or parsed.config, parsed.overrides)
        assert (args.learning_rate, script_args.stage_tokens, args.per_device_train_batch_size) == (1e-4, [32, 96], 2)
    assert args.remove_unused_columns is False
    # no YAML at all: every field on the command line, prune stages as JSON objects
    script_args, _ = load_distill_config(
        None, ["--dataset_name", "x", "--prune_stages", "{}", '{"num_experts": 2}', "--stage_tokens", "5", "6",
               "--output_dir", str(tmp_path), "--use_cpu"],
    )  # fmt: skip
    assert script_args.prune_stages == [{}, {"num_experts": 2}]


def test_bad_input_is_one_line(capsys, tmp_path, stock_teacher):
    config = write_config(tmp_path / "d.yaml", stock_teacher)
    message = error_line(capsys, ["distill", "--config", str(config), "--learning_rate", "fast"])
    assert "--learning_rate" in message and "invalid float value: 'fast'" in message
    message = error_line(capsys, ["distill", str(config), "--config", str(tmp_path / "other.yaml")])
    assert "two config files" in message
    (tmp_path / "typo.yaml").write_text(config.read_text() + "lamda_start: 1\n")
    assert "lamda_start" in error_line(capsys, ["distill", "--config", str(tmp_path / "typo.yaml")])
    assert "no configuration" in error_line(capsys, ["distill"])


# ---- checked before anything loads ------------------------------------------------------------------------------------
def test_explicit_beta_without_mtp_heads_is_refused_before_data(capsys, tmp_path, stock_teacher, nothing_loads):
    config = write_config(tmp_path / "d.yaml", stock_teacher, "num_mtp_heads: 0\n")
    message = error_line(capsys, ["distill", "--config", str(config), "--beta_start", "0.2"])
    assert "beta_start=0.2" in message and "no MTP heads" in message and "num_mtp_heads" in message


def test_default_beta_without_mtp_heads_is_set_to_zero_with_a_notice(tmp_path, stock_teacher):
    script_args, args = load_distill_config(write_config(tmp_path / "d.yaml", stock_teacher, "num_mtp_heads: 0\n"))
    assert args.uses_mtp  # the SlimQwen defaults 0.3 -> 0.1
    plan = plan_distill(script_args, args)
    assert (args.beta_start, args.beta_end, plan.student_mtp_depths) == (0.0, 0.0, 0)
    (notice,) = plan.notices
    assert "set from the defaults 0.3/0.1 to 0" in notice and "stock qwen3_moe" in notice
    # with MTP heads requested (the default num_mtp_heads: 1) the stock student is converted and β stays
    script_args, args = load_distill_config(write_config(tmp_path / "e.yaml", stock_teacher))
    plan = plan_distill(script_args, args)
    assert (args.beta_start, plan.student_mtp_depths, plan.notices) == (0.3, 1, [])
    assert "converted to SlimMoe with 1 MTP head" in plan.student


def test_plan_sizes_tokens_and_steps(tmp_path, stock_teacher):
    script_args, args = load_distill_config(
        write_config(tmp_path / "d.yaml", stock_teacher), ["--stage_tokens", "64", "200"]
    )
    plan = plan_distill(script_args, args)
    assert plan.tokens_per_step == 64 and plan.total_steps == 1 + 4
    assert plan.start_sizes["num_hidden_layers"] == 2 and plan.start_sizes["num_experts"] == 4
    first, second = plan.stages
    assert (first.prune, first.sizes["num_hidden_layers"], first.sizes["num_experts"], first.steps) == (
        {"num_hidden_layers": 1}, 1, 4, 1
    )
    assert (second.prune, second.sizes["num_experts"], second.step_offset, second.steps) == ({"num_experts": 2}, 2, 1, 4)


@pytest.mark.parametrize(
    "extra, match",
    [
        ("teacher_logits_dir: logits\n", r"teacher_logits_dir='logits': hf-slim distill prunes .* offline teacher"),
        ("mtp_kd_target: teacher_mtp\n", r"teacher_mtp.*1 MTP depths.*teacher has 0"),
        ("prune_stages: [{num_experts: 4}]\nstage_tokens: [64]\n", r"prune_stages\[0\] \(stage 1\): num_experts=4"),
    ],
)  # fmt: skip
def test_other_settings_are_refused_before_data(tmp_path, stock_teacher, nothing_loads, extra, match):
    path = write_config(tmp_path / "d.yaml", stock_teacher)
    text = path.read_text() + extra
    if extra.startswith("teacher_logits_dir"):  # an offline teacher has no teacher model
        text = text.replace(f"teacher_model_name_or_path: {stock_teacher}\n", "")
    if extra.startswith("prune_stages"):
        text = text.replace("prune_stages:\n  - {num_hidden_layers: 1}\n  - {num_experts: 2}\nstage_tokens: [64, 64]\n", "")
    path.write_text(text)
    script_args, args = load_distill_config(path)
    with pytest.raises(ValueError, match=match):
        progressive.run_progressive(script_args, args)


# ---- a whole run: plan, training, results ------------------------------------------------------------------------------
def test_stock_student_run_prints_the_plan_and_the_results(capsys, monkeypatch, tmp_path, stock_teacher):
    """The issue's case: a stock student without MTP heads and the default β trains (β set to 0 with a notice)."""
    from huggingface_hub import ModelCard

    monkeypatch.setenv("COLUMNS", "200")
    teacher = tmp_path / "teacher"  # a local copy of a Hub model: its config names it, its card has the licence
    teacher.mkdir()
    for path in stock_teacher.iterdir():
        (teacher / path.name).write_bytes(path.read_bytes())
    teacher_config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**teacher_config, "_name_or_path": "Qwen/Qwen3-30B-A3B"}))
    (teacher / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Qwen3-30B-A3B\n")
    config = write_config(tmp_path / "d.yaml", teacher, "num_mtp_heads: 0\n")
    assert main(["distill", "--config", str(config), "--lambda_end", "0.5"]) == 0
    out = capsys.readouterr().out
    plan_at, notice_at, results_at = (out.index(s) for s in ("2 stage(s) from", "notice:", "results per stage"))
    assert plan_at < notice_at < results_at
    assert "num_hidden_layers=1" in out and "num_experts=2" in out and "64 tokens per optimizer step" in out
    assert str(tmp_path / "run" / "stage-2") in out and out.strip().endswith(f"wrote {tmp_path / 'run' / 'final'}")
    final = tmp_path / "run" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.model_type == "qwen3_moe" and (model.config.num_hidden_layers, model.config.num_experts) == (1, 2)
    history = json.loads((final / "trainer_log_history.json").read_text())
    steps = [h for h in history if "kd" in h]
    assert [h["beta"] for h in steps] == [0.0, 0.0] and [h["lambda"] for h in steps] == pytest.approx([1.0, 0.75])
    assert (final / "loss_curve.png").stat().st_size > 10_000
    assert AutoConfig.from_pretrained(tmp_path / "run" / "stage-1").num_hidden_layers == 1
    card = ModelCard.load(final / "README.md")
    data = card.data
    assert (data.base_model, data.base_model_relation, data.license) == ("Qwen/Qwen3-30B-A3B", "finetune", "apache-2.0")
    # the stdlib docstrings are no Hub dataset (named in the body only); no eval dataset, so no model-index
    assert data.datasets is None and data.eval_results is None and "`hf_slim:stdlib` (not on the Hub)" in card.text


# ---- the loss curve ------------------------------------------------------------------------------------------------
def test_loss_plot_has_one_panel_per_family_and_log_scale_where_values_span_decades(tmp_path):
    def stage(index, offset, kd, lam):
        history = [
            {"step": i + 1, "global_step": offset + i + 1, "loss": (1 - l) * 5.0 + l * k, "lm": 5.0, "kd": k,
             "mtp_lm": 5.5, "mtp_kd": 2 * k, "lambda": l, "beta": 0.2}
            for i, (k, l) in enumerate(zip(kd, lam))
        ] + [{"step": len(kd), "global_step": offset + len(kd), "train_runtime": 1.0, "train_loss": 1.0}]  # fmt: skip
        return StageResult(index, {}, 64, len(kd), offset, f"stage-{index}", history)

    results = [stage(1, 0, [1.0, 0.1, 0.01], [1.0, 0.9, 0.8]), stage(2, 3, [0.5, 0.05, 0.004], [0.7, 0.6, 0.5])]
    panels = _loss_plot(results, tmp_path / "curve.png")
    assert list(panels) == [
        "LM terms (next-token CE)", "KD terms (divergence to the teacher)",
        "total = (1-λ)·LM + λ·KD + β·MTP (+ aux): rises as λ falls while LM ≫ KD", "loss weights λ (KD) and β (MTP)",
    ]  # fmt: skip
    assert list(panels.values()) == ["linear", "log", "linear", "linear"]
    assert (tmp_path / "curve.png").stat().st_size > 10_000
