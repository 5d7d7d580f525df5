"""`hf-slim distill --config CONFIG.yaml [--field value ...]`: the command line of [`trainers.progressive`].

The YAML and the `--field value` overrides are read by `trl.TrlParser` (the options are the fields of
`DistillScriptArguments` and `SlimDistillationConfig`; `hf-slim distill --help` lists them). `hf-slim distill
CONFIG.yaml` (the YAML as the first argument) works too. The whole configuration is checked before the teacher's
weights or any data are loaded (`trainers.progressive.plan_distill`); the stage plan is printed before training and
a table of the stages' results after it.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._common import add_options

__all__ = ["add_distill_parser", "run_distill"]


class _Override(argparse.Action):
    """Collects a dataclass field's option and its raw values in `namespace.overrides`, for `trl.TrlParser` to parse
    (argparse here only splits the command line and lists the fields in `--help`)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        values = [] if values is None else values if isinstance(values, list) else [values]
        namespace.overrides = [*getattr(namespace, "overrides", []), option_string, *values]


def _add_field_options(parser: argparse.ArgumentParser) -> None:
    # from the generated table (hf_slim/cli/_static_distill.py), so that `--help` does not import trl; TrlParser parses the
    # overrides for real when the command runs
    from ._static_distill import DISTILL_FIELD_OPTIONS

    group = parser.add_argument_group(
        "fields of DistillScriptArguments and SlimDistillationConfig (override the YAML; parsed by trl.TrlParser)"
    )
    for option_strings, nargs, help_text, metavar in DISTILL_FIELD_OPTIONS:
        group.add_argument(
            *option_strings, action=_Override, dest="overrides", nargs=nargs, default=argparse.SUPPRESS,
            help=help_text, metavar=metavar,
        )  # fmt: skip


def add_distill_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `distill` sub-command to an `argparse` sub-parsers object.

    Args:
        subparsers: The object returned by `ArgumentParser.add_subparsers()`.

    Returns:
        `argparse.ArgumentParser`: the `distill` parser (its handler is [`run_distill`]).
    """
    parser = subparsers.add_parser(
        "distill",
        usage="hf-slim distill [-h] [--config CONFIG | CONFIG] [--overwrite] [--FIELD VALUE ...]",
        help="Progressive prune -> distill stages from a YAML config (SlimDistillationConfig + script fields).",
        description="Progressive prune -> distill stages. `hf-slim distill --config CONFIG.yaml [--field value ...]`: "
        "the YAML holds DistillScriptArguments and SlimDistillationConfig fields, read by trl.TrlParser; options "
        "override it. The configuration is checked and the stage plan printed before anything is loaded.",
    )
    parser.add_argument("config", nargs="?", help="YAML file (the same as --config).")
    parser.add_argument("--config", dest="config_option", metavar="CONFIG", help="YAML file with the run's fields.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing final folder.")
    parser.set_defaults(handler=run_distill, overrides=[])
    add_options(parser, _add_field_options)
    return parser


def _sizes_row(sizes: dict[str, Any], columns: list[str]) -> list[str]:
    return [str(sizes.get(name)) if sizes.get(name) is not None else "-" for name in columns]


def plan_table(plan: Any, teacher: str) -> Any:
    """The stage plan as a `rich` table: what each stage prunes, the sizes after it, its tokens and steps."""
    from rich.table import Table

    columns = [name for name in plan.start_sizes if any(name in stage.prune for stage in plan.stages)]
    columns = columns or ["num_hidden_layers", "hidden_size"]
    table = Table(
        title=f"hf-slim distill: {len(plan.stages)} stage(s) from {teacher}",
        caption=f"student: {plan.student}; {plan.tokens_per_step:,} tokens per optimizer step",
    )
    for name in ("stage", "prunes to", *columns, "tokens", "steps", "global steps"):
        table.add_column(name, justify="left" if name in ("stage", "prunes to") else "right")
    table.add_row("start", "", *_sizes_row(plan.start_sizes, columns), "", "", "")
    for stage in plan.stages:
        prune = ", ".join(f"{k}={v}" for k, v in stage.prune.items()) or "no pruning"
        first, last = stage.step_offset + 1, stage.step_offset + stage.steps
        table.add_row(
            str(stage.index), prune, *_sizes_row(stage.sizes, columns), f"{stage.tokens:,}", str(stage.steps),
            f"{first}-{last}" if last > first else str(first),
        )  # fmt: skip
    table.add_row("total", "", *[""] * len(columns), f"{sum(s.tokens for s in plan.stages):,}", str(plan.total_steps), "")
    return table


_TERMS = ("loss", "lm", "kd", "mtp_lm", "mtp_kd")


def results_table(results: list[Any]) -> Any:
    """One row per finished stage: its budget, steps, the last logged loss terms and runtime, and its folder."""
    from rich.table import Table

    last = [next((h for h in reversed(r.log_history) if "loss" in h or "kd" in h), {}) for r in results]
    terms = [t for t in _TERMS if any(t in h for h in last)]
    table = Table(title="hf-slim distill: results per stage (last logged step)")
    for name in ("stage", "tokens", "steps", *terms, "runtime", "output"):
        table.add_column(name, justify="left" if name in ("stage", "output") else "right")
    for r, h in zip(results, last):
        runtime = next((x["train_runtime"] for x in r.log_history if "train_runtime" in x), None)
        table.add_row(
            str(r.index), f"{r.tokens:,}", str(r.steps), *(f"{h[t]:.4g}" if t in h else "-" for t in terms),
            f"{runtime:.1f} s" if runtime is not None else "-", r.output_dir,
        )  # fmt: skip
    return table


def run_distill(args: argparse.Namespace) -> int:
    """Handler of `hf-slim distill`: parse, check and plan, print the plan, run the stages, print their results."""
    from rich.console import Console

    from trainers.progressive import load_distill_config, plan_distill, run_progressive

    config = args.config_option or args.config
    if args.config and args.config_option and args.config != args.config_option:
        raise ValueError(f"two config files: {args.config!r} and --config {args.config_option!r}; give one")
    if config is None and not args.overrides:
        raise ValueError("no configuration: pass --config CONFIG.yaml (and/or the fields as --field value options)")
    script_args, training_args = load_distill_config(config, args.overrides)
    if args.overwrite:
        script_args.overwrite = True
    plan = plan_distill(script_args, training_args)  # everything is checked here, before weights or data load
    console = Console(quiet=training_args.process_index != 0)  # under DDP, one process prints
    console.print(plan_table(plan, training_args.teacher_model_name_or_path))
    for notice in plan.notices:
        console.print(f"[yellow]notice:[/yellow] {notice}", highlight=False)
    final_dir, results = run_progressive(script_args, training_args, plan=plan)
    console.print(results_table(results))
    console.print(f"wrote {final_dir}", highlight=False)
    return 0
