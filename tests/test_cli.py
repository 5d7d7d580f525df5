"""The `hf-slim` command line as a whole: every sub-command's help, and the one error policy (hf_slim/cli/errors.py).

The sub-commands' real runs are tested beside what they wrap: test_demo_cli.py (demo, convert), test_pruning.py
(prune), test_elastic.py (slice), test_distillation.py and test_progressive_targets.py (distill).
"""

import argparse
import importlib
import json
import subprocess
import sys
import textwrap

import pytest

import hf_slim.cli.slice
from hf_slim.cli import build_parser, main
from hf_slim.cli.errors import error_message, is_bad_input, run_command
from hf_slim.models.slim_moe import SlimMoeConfig
from hf_slim.optim import NonFiniteGradientError
from hf_slim.utils import atomic_directory

COMMANDS = {  # command -> a flag its help must show
    "demo": "--teacher-steps",
    "convert": "--num-mtp-heads",
    "prune": "--num-experts",
    "slice": "--drop-mtp",
    "distill": "--overwrite",
    "teacher-logits": "--top-k",
}


def _error_line(capsys, command, argv):
    """Run `hf-slim argv`; check the policy for bad input and return the message after `error: `."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    prefix = f"hf-slim {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


@pytest.fixture
def elastic_config_dir(tmp_path):
    """A folder holding only the config.json of a tiny elastic SlimMoe (variant `small`): no weights."""
    config = SlimMoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        elastic={"variants": {"small": {"hidden_size": 16}}},
    )
    config.save_pretrained(tmp_path / "elastic")
    return tmp_path / "elastic"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"usage: hf-slim {command}") and COMMANDS[command] in shown


def test_top_level_help_lists_every_command_without_importing_heavy_modules():
    """`python -m hf_slim.cli --help` (the console script's `main`): no trl, datasets or pipeline modules loaded."""
    script = textwrap.dedent(
        """
        import json, runpy, sys
        sys.argv = ["hf-slim", "--help"]
        try:
            runpy.run_module("hf_slim.cli", run_name="__main__")
        except SystemExit as exit:
            code = exit.code
        heavy = ("trl", "trainers", "datasets", "peft", "hf_slim.demo", "hf_slim.convert", "hf_slim.hub")
        print(json.dumps({"code": code, "heavy": [name for name in heavy if name in sys.modules]}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    *shown, last = done.stdout.strip().splitlines()
    assert json.loads(last) == {"code": 0, "heavy": []}
    assert shown[0].startswith("usage: hf-slim") and all(command in "\n".join(shown) for command in COMMANDS)


# ---- bad input: one line on stderr, exit code 2, no traceback -------------------------------------------------------
def test_demo_bad_size(capsys, tmp_path):
    message = _error_line(capsys, "demo", ["demo", "--teacher-steps", "0", "--output-dir", str(tmp_path)])
    assert "teacher_steps must be positive" in message


def test_convert_existing_output_names_the_flag(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    message = _error_line(capsys, "convert", ["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert "pass --overwrite" in message and "overwrite=True" not in message
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_convert_missing_model_is_one_line(capsys, tmp_path):
    # transformers raises OSError (sometimes over several lines) for a folder or Hub id it cannot load
    assert _error_line(capsys, "convert", ["convert", str(tmp_path / "missing"), str(tmp_path / "out")])


@pytest.mark.parametrize("family, expected", [
    ("deepseek_v3", "deepseek_v3 does not convert to or from SlimMoe: SlimMoe has no multi-head latent attention"),
    ("llama", "--to llama: valid values are slim_moe, "),
])  # fmt: skip
def test_convert_to_a_family_it_cannot_write_says_why(capsys, tmp_path, family, expected):
    message = _error_line(capsys, "convert", ["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", family])
    assert message.startswith(expected)


def test_prune_nothing_to_prune(capsys, tmp_path):
    message = _error_line(capsys, "prune", ["prune", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert message.startswith("nothing to prune")


def test_slice_unknown_variant_prints_the_key_error_without_quotes(capsys, elastic_config_dir, tmp_path):
    argv = ["slice", str(elastic_config_dir), "tiny", str(tmp_path / "out"), "--to", "qwen3_moe"]
    message = _error_line(capsys, "slice", argv)
    assert message.startswith("elastic_variant='tiny' is not a variant") and "'small'" in message


def test_slice_existing_output_names_the_flag(capsys, elastic_config_dir):
    message = _error_line(capsys, "slice", ["slice", str(elastic_config_dir), "small", str(elastic_config_dir)])
    assert "pass --overwrite" in message and "overwrite=True" not in message


def test_distill_missing_config(capsys, tmp_path):
    message = _error_line(capsys, "distill", ["distill", str(tmp_path / "missing.yaml")])
    assert "does not exist" in message


def test_argparse_errors_use_the_same_prefix(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "model", str(tmp_path), "--hidden-size", "half"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("hf-slim prune: error: argument --hidden-size")


# ---- the policy itself ----------------------------------------------------------------------------------------------
def test_python_api_wording_becomes_the_flag(capsys, tmp_path):
    """`hf_slim.utils.atomic_directory` says `pass overwrite=True`; on the command line that is `--overwrite`."""
    (tmp_path / "keep.txt").write_text("x")

    def handler(args):
        with atomic_directory(tmp_path):
            pass

    args = argparse.Namespace(command="slice", handler=handler, overwrite=False, drop_mtp=False, model_type=None)
    assert run_command(args) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("hf-slim slice: error: ") and "pass --overwrite to replace it" in line
    assert error_message(ValueError("pass save_stats=True or no_overwrite=True"), ["save_stats", "overwrite"]) == (
        "pass --save-stats or no_overwrite=True"
    )


def test_messages_are_one_line_and_keyerrors_lose_their_quotes():
    assert error_message(KeyError("variant 'x' is unknown")) == "variant 'x' is unknown"
    assert error_message(OSError("first line.\nsecond  line.")) == "first line. second line."
    assert error_message(ValueError()) == "ValueError"


def test_which_errors_are_bad_input():
    from trainers import NonFiniteLossError

    for error in (ValueError(), TypeError(), KeyError("k"), FileExistsError(), FileNotFoundError(),
                  NotADirectoryError(), PermissionError(), NonFiniteGradientError("nan"),
                  NonFiniteLossError("nan", step=3, terms={"kd": "nan"})):
        assert is_bad_input(error), error
    for error in (RuntimeError(), AttributeError(), ZeroDivisionError(), IndexError(), AssertionError()):
        assert not is_bad_input(error), error


def test_a_bug_keeps_its_traceback(capsys, monkeypatch, elastic_config_dir, tmp_path):
    def bug(args):
        raise AttributeError("'NoneType' object has no attribute 'config'")

    monkeypatch.setattr(hf_slim.cli.slice, "run_slice", bug)
    with pytest.raises(AttributeError, match="no attribute 'config'"):  # propagates: Python prints it, exit code 1
        main(["slice", str(elastic_config_dir), "small", str(tmp_path / "out")])
    assert capsys.readouterr().err == ""


def test_ctrl_c_is_one_line_and_exit_code_130(capsys, monkeypatch, elastic_config_dir, tmp_path):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_slim.cli.slice, "run_slice", interrupted)
    assert main(["slice", str(elastic_config_dir), "small", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "hf-slim slice: interrupted\n"


def test_hf_slim_traceback_shows_the_traceback_of_bad_input(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_SLIM_TRACEBACK", "1")
    assert main(["distill", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.splitlines()[-1].startswith("hf-slim distill: error: config file")


# ---- old import paths ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "old, new, names",
    [
        ("hf_slim.elastic.cli", "hf_slim.cli.slice", ["add_slice_parser", "run_slice"]),
        ("hf_slim.pruning.cli", "hf_slim.cli.prune",
         ["add_prune_parser", "run_prune", "read_calibration_texts", "before_after_table"]),
        ("trainers.cli", "hf_slim.cli.distill", ["add_distill_parser", "run_distill"]),
    ],
)
def test_old_cli_modules_warn_and_re_export(old, new, names, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(FutureWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    for name in names:
        assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_build_parser_parses_every_command_with_its_handler(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["prune", "model", str(tmp_path), "--num-experts", "0.5", "--overwrite"])
    assert (args.command, args.num_experts, args.overwrite, args.handler.__name__) == ("prune", 0.5, True, "run_prune")
    args = parser.parse_args(["demo", "--hidden-size", "64"])
    assert (args.command, args.hidden_size, args.handler.__name__) == ("demo", 64, "run_demo")
