"""The `hf-slim` command line as a whole: every sub-command's help, and the one error policy (hf_slim/cli/errors.py).

The sub-commands' real runs are tested beside what they wrap: test_demo_cli.py (demo, convert), test_pruning.py
(prune), test_elastic.py (slice), test_distillation.py and test_progressive_targets.py (distill).
"""

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

import hf_slim.cli.slice
from hf_slim.cli import build_parser, main
from hf_slim.cli.errors import error_message, is_bad_input, run_command
from hf_slim.cli.generate_static import static_sources
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
    "push": "--dry-run",
    "trl": "--in-process",
}
HEAVY = ("torch", "transformers", "trl", "trainers", "datasets", "peft", "bitsandbytes", "safetensors", "hf_slim.demo",
         "hf_slim.convert", "hf_slim.hub", "hf_slim.models", "hf_slim.optim", "hf_slim.pruning")  # fmt: skip


def _python(*parts: str) -> subprocess.CompletedProcess:
    """Run the code `parts` (each dedented) in a fresh interpreter, offline; fail with its stderr if it fails."""
    code = "\n".join(textwrap.dedent(part) for part in parts)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def _error_line(capsys, command, argv, only_line=True):
    """Run `hf-slim argv`; check the policy for bad input and return the message after `error: `.

    `only_line=False` lets other stderr lines (progress bars, a library's warnings) come first: the error is the last.
    """
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.replace("\r", "\n").splitlines() if line.strip()]
    prefix = f"hf-slim {command}: error: "
    if only_line:
        assert captured.out == "" and len(lines) == 1, captured.err
    assert lines[-1].startswith(prefix) and sum(line.startswith(prefix) for line in lines) == 1, captured.err
    return lines[-1][len(prefix):]


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


def test_every_help_imports_nothing_heavy_and_is_quiet():
    """`hf-slim --help` and each command's `--help`, in a fresh process as the console script runs them: no torch,
    transformers, trl, bitsandbytes or pipeline module imported (those imports are what took 7-9 s; the times are
    measured in the README, never asserted here) and nothing on stderr (no library warning)."""
    commands = list(COMMANDS)
    done = _python(
        f"""
        import contextlib, io, json, sys
        from hf_slim.cli import main
        heavy = {{}}
        for argv in [["--help"]] + [[command, "--help"] for command in {commands!r}]:
            with contextlib.redirect_stdout(io.StringIO()) as shown:
                try:
                    main(argv)
                except SystemExit as exit:
                    assert exit.code == 0, (argv, exit.code)
            assert shown.getvalue().startswith("usage: hf-slim"), argv
            heavy[argv[0]] = [name for name in {HEAVY!r} if name in sys.modules]
        print(json.dumps(heavy))
        """
    )
    heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert heavy == {argv: [] for argv in ["--help", *commands]}
    assert done.stderr == ""


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    shown = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--debug" in shown and all(command in shown for command in COMMANDS)


def _subparsers(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    parsers = {"hf-slim": parser, **{f"hf-slim {name}": sub for name, sub in _subparsers(parser).items()}}
    assert set(parsers) == {"hf-slim", *(f"hf-slim {command}" for command in COMMANDS)}
    missing = []
    for name, sub in parsers.items():
        sub.format_help()  # adds the options a command defers to its first use
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help text: {missing}"


def test_static_options_are_the_dataclasses_fields():
    """prune / demo / convert / distill build their options from hf_slim/cli/_static*.py (no torch or trl at --help):
    they must be what the dataclasses say now."""
    from hf_slim.cli.demo import DEMO_HELP
    from hf_slim.demo import DemoConfig

    for path, text in static_sources().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run `python -m hf_slim.cli.generate_static`"
    assert set(DEMO_HELP) == {f.name for f in dataclasses.fields(DemoConfig)}


def test_import_hf_slim_is_lazy_and_registers_once_transformers_loads():
    """`import hf_slim` imports neither torch nor transformers; every public name still imports from it, and SlimMoe
    (Auto classes) and optim="aurora" are registered as soon as transformers is loaded, whatever the import order."""
    after = """
        from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments
        config = AutoConfig.for_model("slim_moe")
        assert type(config).__name__ == "SlimMoeConfig", config
        assert AutoModelForCausalLM._model_mapping[type(config)].__name__ == "SlimMoeForCausalLM"
        assert TrainingArguments("unused", optim="aurora_lora", report_to=[]).optim.value == "aurora_lora"
        """
    _python(  # hf_slim first, then transformers: registered right after transformers loads
        f"""
        import sys
        import hf_slim
        assert [m for m in {HEAVY!r} if m in sys.modules] == [], sorted(sys.modules)
        """,
        after,
        """
        for name in hf_slim.__all__:
            assert getattr(hf_slim, name) is not None, name
        from hf_slim import PruneConfig, SlimMoeForCausalLM, prune, slice_checkpoint
        from hf_slim.pruning import PruneConfig as same
        assert same is PruneConfig and hf_slim.pruning.prune is prune and hf_slim.anatomy.get_spec
        assert "register_with_transformers" in dir(hf_slim)
        """
    )
    _python(  # transformers first: `import hf_slim` registers at once
        """
        import sys
        import transformers
        import hf_slim
        assert "hf_slim.models" in sys.modules and "hf_slim.optim" in sys.modules
        """,
        after,
    )
    _python(  # a submodule first, which imports transformers itself: registered once that import is done
        """
        from hf_slim.pruning.config import PruneConfig
        """,
        after,
    )


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


@pytest.mark.parametrize("argv, expected", [
    (["prune", "model", "out", "--hidden-size", "half"],
     "hf-slim prune: error: argument --hidden-size: 'half' is neither an int nor a fraction (see `hf-slim prune --help`)"),
    (["prune", "model"], "hf-slim prune: error: the following arguments are required: output (see `hf-slim prune --help`)"),
    (["pruen"], "hf-slim: error: argument command: invalid choice: 'pruen' (choose from "),
])  # fmt: skip
def test_argparse_errors_are_one_line_with_the_same_prefix(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def _byte_tokenizer(folder):
    """A tokenizer of 160 single-character tokens (the tiny test models' vocabulary), saved in `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={chr(i): i for i in range(160)}, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0)).save_pretrained(folder)
    return folder


def test_prune_a_model_without_tokenizer_files_says_so(capsys, tmp_path):
    """transformers builds a tokenizer of special tokens alone for a folder with no tokenizer files (2 tokens for
    OLMoE), which encodes text to nothing: prune says so before calibrating, and --tokenizer supplies one."""
    from test_anatomy import real_text, tiny_model

    src = tmp_path / "src"
    tiny_model("olmoe").save_pretrained(src)
    (tmp_path / "calib.txt").write_text("\n\n".join(real_text()[:40]))
    argv = ["prune", str(src), str(tmp_path / "out"), "--num-experts", "4", "--calibration", str(tmp_path / "calib.txt"),
            "--num-samples", "2", "--max-length", "16"]  # fmt: skip
    message = _error_line(capsys, "prune", argv, only_line=False)
    assert message == (
        f"{src} has no tokenizer files (tokenizer.json / tokenizer_config.json) to encode --calibration; pass "
        "--tokenizer or add them"
    )
    message = _error_line(capsys, "prune", [*argv, "--tokenizer", str(src)], only_line=False)
    assert message.startswith(f"--tokenizer {src}: no tokenizer there (it encodes text to no tokens)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "src"]  # nothing written
    tokenizer = _byte_tokenizer(tmp_path / "tokenizer")
    assert main([*argv, "--tokenizer", str(tokenizer)]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_prune_config_that_is_not_json_names_the_file(capsys, tmp_path):
    (tmp_path / "prune.json").write_text('{"num_experts": ')
    argv = ["prune", str(tmp_path / "missing"), str(tmp_path / "out"), "--config", str(tmp_path / "prune.json")]
    message = _error_line(capsys, "prune", argv)
    assert message.startswith(f"--config {tmp_path / 'prune.json'}: not valid JSON (Expecting value: line 1")


def test_slice_refused_by_the_writer_names_the_flag(capsys, monkeypatch, tmp_path):
    """The library's own refusal of a non-empty output (`pass overwrite=True`, from `atomic_directory`, as when the
    folder appears after the command's check) reads `--overwrite` on the command line too."""
    from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM

    config = SlimMoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        elastic={"variants": {"small": {"hidden_size": 16}}},
    )  # fmt: skip
    SlimMoeForCausalLM(config).save_pretrained(tmp_path / "elastic")
    argv = ["slice", str(tmp_path / "elastic"), "small", str(tmp_path / "out")]
    assert main(argv) == 0
    capsys.readouterr()
    assert "pass --overwrite" in _error_line(capsys, "slice", argv)  # the command's check
    monkeypatch.setattr(hf_slim.cli.slice, "check_output", lambda output, overwrite: None)
    message = _error_line(capsys, "slice", argv, only_line=False)  # the writer's
    assert message == f"Output folder {tmp_path / 'out'} exists and is not empty; pass --overwrite to replace it."


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
    from huggingface_hub.errors import EntryNotFoundError  # a plain Exception, unlike its Local/Remote subclasses
    from trainers import NonFiniteLossError

    for error in (ValueError(), TypeError(), KeyError("k"), FileExistsError(), FileNotFoundError(),
                  NotADirectoryError(), PermissionError(), NonFiniteGradientError("nan"),
                  NonFiniteLossError("nan", step=3, terms={"kd": "nan"}), json.JSONDecodeError("x", "", 0),
                  EntryNotFoundError("no x.json in repo a/b")):  # fmt: skip
        assert is_bad_input(error), error
    for error in (RuntimeError(), AttributeError(), ZeroDivisionError(), IndexError(), AssertionError(),
                  ImportError(), NotImplementedError(), Exception()):  # fmt: skip
        assert not is_bad_input(error), error


def _policy(capsys, handler, command="convert"):
    """`handler` under the policy; the exit code and the message after `error: ` (one line, no traceback)."""
    args = argparse.Namespace(command=command, handler=handler, overwrite=False)
    code = run_command(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return code, err.strip().removeprefix(f"hf-slim {command}: error: ")


def test_hub_errors_are_bad_input(capsys, tmp_path):
    """What huggingface_hub raises for a repository that is not there (online) or not cached (offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import hf_raise_for_status

    httpx = pytest.importorskip("httpx2")  # huggingface_hub's HTTP client

    def not_found(args):
        request = httpx.Request("GET", "https://huggingface.co/api/models/hf-slim-test/missing")
        hf_raise_for_status(httpx.Response(404, headers={"X-Error-Code": "RepoNotFound"}, request=request))

    code, message = _policy(capsys, not_found)
    assert code == 2 and message.startswith("404 Client Error. Repository Not Found for url: ")

    def not_cached(args):  # HF_HUB_OFFLINE=1
        hf_hub_download("hf-slim-test/not-cached", "config.json", cache_dir=tmp_path)

    code, message = _policy(capsys, not_cached)
    assert code == 2 and "cannot find the requested files in the local cache" in message


def test_a_malformed_hub_id_is_one_line(capsys, tmp_path):
    """A malformed Hub id reaches huggingface_hub: `HFValidationError` (a ValueError). (A local path that does not
    exist is named as a missing folder before that: tests/test_bad_input_cli.py.)"""
    argv = ["teacher-logits", "bad id!", "hf_slim:stdlib", str(tmp_path / "out")]
    assert "Repo id must" in _error_line(capsys, "teacher-logits", argv, only_line=False)


def test_a_damaged_safetensors_file_is_one_line_naming_it(capsys, tmp_path):
    """safetensors' `SafetensorError` (no file in its text) is bad input; the message names the file."""
    from test_anatomy import real_text, tiny_model

    teacher = tmp_path / "teacher"
    tiny_model("qwen3_moe").save_pretrained(teacher)
    _byte_tokenizer(teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "data.txt").write_text("\n\n".join(real_text()[:5]))
    argv = ["teacher-logits", str(teacher), str(tmp_path / "data.txt"), str(tmp_path / "out"), "--max-length", "16"]
    message = _error_line(capsys, "teacher-logits", argv, only_line=False)
    assert message.startswith(f"{weights}: not a readable safetensors file: Error while deserializing header")


def test_malformed_yaml_is_one_line_naming_the_file(capsys, tmp_path):
    (tmp_path / "run.yaml").write_text("teacher_model_name_or_path: [a, b\nlearning_rate: 1e-4\n")
    message = _error_line(capsys, "distill", ["distill", str(tmp_path / "run.yaml")], only_line=False)
    assert message.startswith("not valid YAML: ") and str(tmp_path / "run.yaml") in message and "line 2" in message


def test_a_runtime_error_is_a_bug(capsys):
    import torch

    def shapes(args):
        return torch.ones(2, 3) @ torch.ones(2, 3)

    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        run_command(argparse.Namespace(command="prune", handler=shapes))
    assert capsys.readouterr().err == ""


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


def test_debug_shows_the_traceback_of_bad_input(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_SLIM_TRACEBACK", raising=False)
    argv = ["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "llama"]
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.splitlines()[-1].startswith("hf-slim convert: error: --to llama: ")
    assert main(argv) == 2 and "Traceback" not in capsys.readouterr().err


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
