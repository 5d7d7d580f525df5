"""Bad input at the command line: each case runs `hf-slim <command> ...` and asserts the house policy (one line
`hf-slim <command>: error: ...` on stderr, exit code 2, no traceback) and that the message names the flag, field or
file, with the value where there is one (issue 15). One parametrized table per command."""

from __future__ import annotations

import json
import re

import pytest

from hf_slim.cli import main


def _error_line(capsys, command, argv, only_line=True):
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors (a flag's type) exit 2 the same way
        code = exit_info.code
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.replace("\r", "\n").splitlines() if line.strip()]
    prefix = f"hf-slim {command}: error: "
    if only_line:
        assert len(lines) == 1, captured.err
    assert lines[-1].startswith(prefix) and sum(line.startswith(prefix) for line in lines) == 1, captured.err
    return lines[-1][len(prefix):]


def _check(capsys, command, argv, pattern, only_line=True):
    message = _error_line(capsys, command, argv, only_line)
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


# ---- hf-slim distill --config: YAML read by trl.TrlParser --------------------------------------------------------
GOOD = (
    "bf16: false\nuse_cpu: true\nteacher_model_name_or_path: /nonexistent/teacher\ndataset_name: hf_slim:stdlib\n"
    "prune_stages:\n  - {num_experts: 2}\nstage_tokens: [1000]\n"
)
DISTILL = [
    ("empty", "", [], r"empty.yaml: Config file .*empty.yaml must contain a YAML mapping"),
    ("list", "- a\n- b\n", [], r"list.yaml: Config file .*list.yaml must contain a YAML mapping"),
    ("scalar", "hello\n", [], r"scalar.yaml must contain a YAML mapping"),
    ("malformed", "a: [1,\n", [], r"not valid YAML: .*malformed.yaml"),
    ("lr_type", GOOD + "learning_rate: fast\n", [], r"lr_type.yaml: argument --learning_rate.*invalid float value: 'fast'"),
    ("max_length_type", GOOD + "max_length: long\n", [], r"argument --max_length.*invalid int value: 'long'"),
    ("max_length_zero", GOOD + "max_length: 0\n", [], r"max_length_zero.yaml: max_length must be None or an int >= 2.*got 0"),
    ("stages_type", GOOD.replace("prune_stages:\n  - {num_experts: 2}\n", "prune_stages: 3\n"), [],
     r"prune_stages must be a list of PruneConfig dicts, got 3"),
    ("tokens_type", GOOD.replace("[1000]", "lots"), [], r"argument --stage_tokens.*invalid int value: 'lots'"),
    ("bool_type", GOOD + "seed: 1\nbf16: maybe\n", [], r"argument --bf16: Truthy value expected: got maybe"),
    ("unknown_key", GOOD + "learning_rat: 0.1\n", [], r"unknown_key.yaml: Unknown arguments from config file: \['--learning_rat'"),
    ("temperature_list", GOOD + "temperature: [1, 2]\n", [], r"temperature must be a number > 0, got \[1, 2\]"),
    ("override_type", GOOD, ["--learning_rate", "fast"], r"argument --learning_rate.*invalid float value: 'fast'"),
    ("override_range", GOOD, ["--temperature", "0"], r"temperature must be a number > 0, got 0.0"),
    ("divergence", GOOD + "divergence: kl\n", [], r"divergence must be one of .*got 'kl'"),
]  # fmt: skip


@pytest.mark.parametrize("name, text, extra, pattern", DISTILL, ids=[case[0] for case in DISTILL])
def test_distill_config(capsys, tmp_path, name, text, extra, pattern):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text + (f"output_dir: {tmp_path / 'out'}\n" if text.startswith("bf16") else ""))
    _check(capsys, "distill", ["distill", "--config", str(path), *extra], pattern, only_line=name != "empty")


def test_distill_missing_config_file(capsys, tmp_path):
    _check(capsys, "distill", ["distill", "--config", str(tmp_path / "nope.yaml")], r"config file '.*nope.yaml' does not exist")


# ---- hf-slim prune / slice / convert ----------------------------------------------------------------------------
def _files(tmp_path):
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "bad.json").write_text("{x")
    (tmp_path / "prune.yaml").write_text("hidden_size: big\n")
    config = tmp_path / "typed"  # a config.json whose field has the wrong type
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"model_type": "slim_moe", "vocab_size": "64"}))
    return tmp_path


PRUNE_SLICE_CONVERT = [
    ("prune", ["prune", "{m}", "{o}", "--hidden-size", "0"], r"hidden_size=0: must be >= 1"),
    ("prune", ["prune", "{m}", "{o}", "--hidden-size", "big"], r"argument --hidden-size: 'big' is neither an int nor a fraction"),
    ("prune", ["prune", "{m}", "{o}", "--hidden-size", "1.5"], r"hidden_size=1.5: a fraction must lie in \(0, 1\]"),
    ("prune", ["prune", "{m}", "{o}", "--expert-strategy", "drop"], r"expert_strategy='drop': valid values are"),
    ("prune", ["prune", "{m}", "{o}", "--target-total-params", "lots"], r"target_total_params='lots': not a parameter count"),
    ("prune", ["prune", "{m}", "{o}", "--config", "{t}/nope.json"], r"No such file or directory: '.*nope.json'"),
    ("prune", ["prune", "{m}", "{o}", "--config", "{t}/list.json"], r"--config .*list.json: expected a JSON object, got list"),
    ("prune", ["prune", "{m}", "{o}", "--config", "{t}/bad.json"], r"--config .*bad.json: not valid JSON"),
    ("prune", ["prune", "{m}", "{o}", "--config", "{t}/prune.yaml"], r"--config .*prune.yaml: not valid JSON"),
    ("prune", ["prune", "{m}", "{o}", "--hidden-size", "16"], r"source '.*missing' does not exist: no such local folder"),
    ("slice", ["slice", "{m}", "small", "{o}"], r"source '.*missing' does not exist: no such local folder"),
    ("convert", ["convert", "{m}", "{o}"], r"source '.*missing' does not exist: no such local folder"),
    ("convert", ["convert", "{m}", "{o}", "--num-mtp-heads", "x"], r"argument --num-mtp-heads: invalid int value: 'x'"),
    ("convert", ["convert", "{t}/typed", "{o}"], r"field 'vocab_size'.*expected int, got str"),
]  # fmt: skip


@pytest.mark.parametrize("command, argv, pattern", PRUNE_SLICE_CONVERT)
def test_prune_slice_convert(capsys, tmp_path, command, argv, pattern):
    root = _files(tmp_path)
    fill = {"{m}": str(root / "missing"), "{o}": str(root / "out")}
    argv = [fill.get(a, a).replace("{t}", str(root)) for a in argv]
    _check(capsys, command, argv, pattern)


# ---- hf-slim teacher-logits / push / demo ------------------------------------------------------------------------
OTHERS = [
    ("teacher-logits", ["--top-k", "0"], r"--top-k must be an integer >= 1, got 0"),
    ("teacher-logits", ["--max-length", "1"], r"--max-length must be an integer >= 2, got 1"),
    ("teacher-logits", ["--batch-size", "0"], r"--batch-size must be an integer >= 1, got 0"),
    ("teacher-logits", ["--layerwise", "--rows-per-pass", "0"], r"--rows-per-pass must be an integer >= 1, got 0"),
    ("teacher-logits", ["--dtype", "float99"], r"--dtype must be auto, float32, bfloat16 or float16, got 'float99'"),
    ("teacher-logits", ["--rows-per-pass", "8"], r"--rows-per-pass and --max-memory apply to a --layerwise teacher only"),
    ("teacher-logits", [], r"teacher '.*missing': no such local folder"),
    ("teacher-logits", ["--tokenizer", "./no/such/tokenizer"], r"tokenizer './no/such/tokenizer': no such local folder"),
    ("push", [], r"folder .*missing does not exist"),
    ("push", ["bad id!"], r"repo_id 'bad id!' is not a Hub repository id"),
    ("demo", ["--vocab-size", "1"], r"vocab_size must be at least 260 for byte-level BPE, got 1"),
    ("demo", ["--hidden-size", "0"], r"hidden_size a positive multiple of 16.*got hidden_size=0"),
    ("demo", ["--hidden-size", "30"], r"hidden_size a positive multiple of 16.*got hidden_size=30"),
    ("demo", ["--num-experts", "2"], r"num_experts >= 4.*num_experts=2"),
    ("demo", ["--num-experts-per-tok", "9"], r"DemoConfig.num_experts_per_tok must be between 1 and num_experts=8, got 9"),
    ("demo", ["--learning-rate", "-1"], r"DemoConfig.learning_rate must be a number > 0, got -1.0"),
    ("demo", ["--block-size", "1"], r"block_size must be >= 2, got 1"),
    ("demo", ["--num-mtp-heads", "-1"], r"DemoConfig.num_mtp_heads must be >= 0, got -1"),
    ("demo", ["--batch-size", "0"], r"DemoConfig.batch_size must be positive, got 0"),
    ("demo", ["--eval-documents", "-1"], r"DemoConfig.eval_documents must be >= 0, got -1"),
    ("demo", ["--moe-intermediate-size", "0"], r"DemoConfig.moe_intermediate_size must be >= 1, got 0"),
    ("demo", ["--teacher-steps", "0"], r"DemoConfig.teacher_steps must be positive, got 0"),
]  # fmt: skip


@pytest.mark.parametrize("command, extra, pattern", OTHERS)
def test_teacher_logits_push_demo(capsys, tmp_path, command, extra, pattern):
    missing, out = str(tmp_path / "missing"), str(tmp_path / "out")
    if command == "teacher-logits":
        teacher = str(tmp_path) if "--tokenizer" in extra else missing  # an existing teacher folder: the tokenizer is named
        argv = [command, teacher, "hf_slim:stdlib", out, *extra]
    elif command == "push":
        argv = [command, missing if not extra else str(tmp_path), *(extra or ["user/name"]), "--dry-run"]
    else:
        argv = [command, "--output-dir", out, *extra]
    _check(capsys, command, argv, pattern)
