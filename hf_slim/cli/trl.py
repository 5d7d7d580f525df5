"""`hf-slim trl <command> [args ...]`: TRL's own scripts and CLI with hf-slim's ``--optim aurora`` / ``aurora_lora``.

Why a passthrough: TRL (checked in 1.16) has no way to import extra code before it parses a script's arguments. The
``--optim`` choices are built from transformers' `OptimizerNames` when `TrlParser` is created, before ``--config``
YAML is read (its ``env:`` section only sets environment variables); TRL loads no plugins or entry points; the only
import paths it takes (GRPO/RLOO ``--reward_funcs``) are imported after parsing; and transformers' ``optim`` takes a
name, not an import path. So ``trl sft --optim aurora`` stops at ``invalid choice: 'aurora'`` unless the process
imported `hf_slim` first, which this command does, without patching TRL.

- A training command (``sft``, ``dpo``, ``grpo``, ... : TRL's `TrainingCommand`s) does what ``trl <command>`` does:
  its script's `TrlParser` reads the arguments (so a bad value fails here), the ones the script does not know go to
  ``accelerate launch`` (``--num_processes``, ``--accelerate_config``, ...), and each launched process runs
  ``python -m hf_slim.cli trl --in-process <command> [script args]``, which registers hf-slim's optimizers and runs
  TRL's script file ``trl/scripts/<command>.py`` unchanged as ``__main__``.
- ``--in-process`` runs that script in this process instead, with no launcher: for ``accelerate launch -m hf_slim.cli
  trl --in-process sft ...`` or ``torchrun -m hf_slim.cli trl --in-process sft ...``, or a quick single-process run.
- Any other TRL command (``env``, ``vllm-serve``) is handed to TRL's CLI `main` in this process.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_trl_parser", "run_trl", "run_trl_script", "trl_training_commands"]

_CHILD = ["hf_slim.cli", "trl", "--in-process"]  # each launched process runs `python -m` this


def add_trl_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `trl` sub-command to an `argparse` sub-parsers object.

    Args:
        subparsers: The object returned by `ArgumentParser.add_subparsers()`.

    Returns:
        `argparse.ArgumentParser`: the `trl` parser (its handler is [`run_trl`]).
    """
    parser = subparsers.add_parser(
        "trl",
        help="Run a TRL command (trl sft, dpo, grpo, ...) with hf-slim's optimizers registered (--optim aurora).",
        description="Run `trl <command> [args ...]` with hf-slim's optimizers registered, so that `--optim aurora` "
        "and `--optim aurora_lora` (with `--use_peft`) are valid choices. Everything after the command goes to TRL: "
        "`hf-slim trl sft --help` shows the script's options.",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="Run the TRL script in this process instead of through `accelerate launch` (what each launched process "
        "does; use it under your own `accelerate launch -m hf_slim.cli` or `torchrun -m hf_slim.cli`).",
    )
    parser.add_argument(
        "trl_args",
        nargs=argparse.REMAINDER,
        metavar="COMMAND [ARGS ...]",
        help="A TRL command (sft, dpo, grpo, kto, reward, rloo, distillation, env, vllm-serve) and its arguments.",
    )
    parser.set_defaults(handler=run_trl)
    return parser


def _register() -> None:
    from ..optim.trainer import register_aurora_with_transformers

    register_aurora_with_transformers()


def trl_training_commands() -> list[str]:
    """The TRL commands that run a training script under `accelerate launch` (`trl.cli` `TrainingCommand`s)."""
    from trl.cli.commands import get_commands
    from trl.cli.commands.training import TrainingCommand

    return [command.name for command in get_commands() if isinstance(command, TrainingCommand)]


def run_trl(args: argparse.Namespace) -> int:
    """Handler of `hf-slim trl`: register hf-slim's optimizers, then run the TRL command. Returns the exit code."""
    _register()
    argv = list(args.trl_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0].startswith("-"):
        from trl.cli import main as trl_main

        if argv and argv[0] not in ("-h", "--help"):
            raise ValueError(f"expected a TRL command before {argv[0]!r}, e.g. `hf-slim trl sft --optim aurora ...`")
        return trl_main(argv)
    command, rest = argv[0], argv[1:]
    from trl.cli.commands import get_commands

    known = [c.name for c in get_commands()]
    if command not in known:
        raise ValueError(f"{command!r} is not a TRL command; TRL's commands: {', '.join(known)}")
    training = trl_training_commands()
    if command not in training:
        if args.in_process:
            raise ValueError(f"--in-process runs a TRL training script ({', '.join(training)}), not {command!r}")
        from trl.cli import main as trl_main

        return trl_main(argv)
    if args.in_process:
        return run_trl_script(command, rest)
    return _launch(command, rest)


def _subtract_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """`items` without the ordered `subsequence` (as TRL's `TrainingCommand` splits script and launcher arguments)."""
    rest, it = [], iter(subsequence)
    current = next(it, None)
    for item in items:
        if current is not None and item == current:
            current = next(it, None)
        else:
            rest.append(item)
    return rest


def _launch(command: str, argv: list[str]) -> int:
    """`trl <command>` with the launched script replaced by `python -m hf_slim.cli trl --in-process <command>`."""
    import importlib
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    script = importlib.import_module(f"trl.scripts.{command}")
    parser = script.make_parser(prog=f"hf-slim trl {command}")
    # parses (and checks) every argument here, as `trl <command>` does; `--help` prints the script's options and exits
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)
    script_args = _subtract_subsequence(argv, cli_remaining)
    accelerate_args = launch_command_parser().parse_args(
        [*launch_args, "--module", *_CHILD, command, *script_args]
    )
    try:
        launch_command(accelerate_args)
    except subprocess.CalledProcessError as error:  # the launched process printed its own error (or traceback)
        return error.returncode
    return 0


def run_trl_script(command: str, argv: list[str]) -> int:
    """Run TRL's script `trl/scripts/<command>.py` as `__main__` in this process, hf-slim's optimizers registered.

    Args:
        command (`str`): A TRL training command, e.g. `"sft"`.
        argv (`list[str]`): The script's arguments (`sys.argv[1:]` as the script sees it).

    Returns:
        `int`: 0 (a failing script raises).
    """
    import importlib.resources
    import runpy

    _register()
    path = importlib.resources.files("trl.scripts").joinpath(f"{command}.py")
    if not path.is_file():
        raise ValueError(f"TRL has no script {command}.py; training commands: {', '.join(trl_training_commands())}")
    saved = sys.argv
    sys.argv = [str(path), *argv]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved
    return 0
