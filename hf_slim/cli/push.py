"""`hf-slim push FOLDER REPO_ID`: upload a Hub-ready folder, its model card re-rendered for the repository id
(`hf_slim.hub.push_to_hub`); `--dry-run` prints what would be uploaded and uploads nothing."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_push_parser", "describe_plan", "run_push"]


def add_push_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `push` sub-command to an `argparse` sub-parsers object (the handler is in `args.handler`)."""
    parser = subparsers.add_parser(
        "push",
        help="Upload a Hub-ready folder to a Hub model repository in one commit, its model card re-rendered for the "
        "repository id (the folder is not changed).",
    )
    parser.add_argument("folder", help="A Hub-ready folder (config.json, weights, README.md) written by hf-slim.")
    parser.add_argument("repo_id", help="The model repository, 'user/name' (created if needed).")
    parser.add_argument("--private", action="store_true", help="Create the repository private (a new one only).")
    parser.add_argument("--revision", default=None, metavar="REV", help="Branch to commit to (created from main).")
    parser.add_argument("--commit-message", default="Upload with hf-slim", help="Message of the upload commit.")
    parser.add_argument(
        "--dry-run", action="store_true", help="Print the files, their sizes and the card's changes; upload nothing."
    )
    parser.set_defaults(handler=run_push)
    return parser


def describe_plan(plan: Any) -> str:
    """A `hf_slim.hub.PushPlan` in words: where to, the files and their sizes, then the card's diff."""
    where = plan.repo_id + (f" (revision {plan.revision})" if plan.revision else "")
    lines = [f"{plan.folder} -> https://huggingface.co/{where}"]
    lines += [f"{size:>16,}  {name}" for name, size in plan.files]
    lines.append(f"{sum(size for _, size in plan.files):>16,}  bytes in {len(plan.files)} files")
    if plan.card_diff:
        lines += [f"README.md, re-rendered for {plan.repo_id}:", *plan.card_diff]
    else:
        lines.append("README.md: uploaded as it is")
    return "\n".join(lines)


def run_push(args: argparse.Namespace) -> int:
    """Handler of `hf-slim push`: `hf_slim.hub.plan_push`, printed; then `hf_slim.hub.push_to_hub` unless
    `--dry-run`."""
    from ..hub import plan_push, push_to_hub

    plan = plan_push(args.folder, args.repo_id, revision=args.revision)
    print(describe_plan(plan))
    if args.dry_run:
        print("dry run: nothing uploaded")
        return 0
    url = push_to_hub(
        args.folder,
        args.repo_id,
        private=True if args.private else None,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    print(f"uploaded: {url}")
    return 0
