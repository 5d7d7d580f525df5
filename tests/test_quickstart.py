"""docs/quickstart.md runs as written: every snippet, top to bottom, in one namespace, offline on CPU.

Convention (also stated at the top of the page):

- a ```` ```python ```` fence is executed with `exec`, in order, in one namespace shared by all snippets;
- a ```` ```bash exec ```` fence holds `hf-slim ...` commands (one per line, `\\` continues a line, `#` starts a
  comment); each is run in this process as `hf_slim.cli.main(shlex.split(command)[1:])` and must exit with 0;
- any other fence (plain ```` ```bash ````: installing, ```` ```text ````, ...) is not executed.

Everything runs in a temporary working directory (the page's `quickstart/` folder lands there) with
`HF_HUB_OFFLINE=1`. A snippet that raises fails the test, with a traceback pointing at the page's own line numbers.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
EXECUTED = {("python",): "python", ("bash", "exec"): "cli"}


def snippets(text: str) -> list[tuple[str, int, str]]:
    """`(kind, first line number of the body, body)` for every fence, `kind` being "python", "cli" or "skip"."""
    found = []
    for match in FENCE.finditer(text):
        kind = EXECUTED.get(tuple(match.group(1).split()), "skip")
        line = text.count("\n", 0, match.start(2)) + 1
        found.append((kind, line, match.group(2)))
    return found


def cli_commands(body: str) -> list[str]:
    """The commands of a `bash exec` snippet: `\\`-continued lines joined, blank and comment lines dropped."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def test_snippet_conventions():
    found = snippets(DOC.read_text(encoding="utf-8"))
    kinds = [kind for kind, _, _ in found]
    assert kinds.count("python") >= 8 and kinds.count("cli") >= 2
    skipped = [body for kind, _, body in found if kind == "skip"]
    assert any("pip install" in body for body in skipped)  # installing is shown, never run here
    for kind, line, body in found:
        if kind == "cli":
            commands = cli_commands(body)
            assert commands and all(c.startswith("hf-slim ") for c in commands), f"docs/quickstart.md:{line}"
        if kind != "skip":
            assert "pip install" not in body, f"docs/quickstart.md:{line} would install into the test environment"
    commands = [c for kind, _, body in found if kind == "cli" for c in cli_commands(body)]
    assert any(c.startswith("hf-slim push ") and c.endswith(" --dry-run") for c in commands)


def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
    from hf_slim.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__quickstart__"}
    for kind, line, body in snippets(DOC.read_text(encoding="utf-8")):
        if kind == "python":
            # pad so that tracebacks name the page's own line numbers
            code = compile("\n" * (line - 1) + body, str(DOC), "exec")
            exec(code, namespace)  # noqa: S102 -- the page's own snippets, on purpose
        elif kind == "cli":
            for command in cli_commands(body):
                assert main(shlex.split(command)[1:]) == 0, f"docs/quickstart.md:{line}: {command}"

    work = tmp_path / "quickstart"
    for folder in ("teacher", "pruned", "pruned-cli", "distilled", "elastic", "teacher-lora", "qwen3-moe-student"):
        assert (work / folder / "config.json").is_file() or (work / folder / "adapter_config.json").is_file(), folder
    # hf-slim's own output folders hold no pickle (training arguments as JSON); `teacher` and `teacher-lora` are stock
    # Trainer's
    for folder in ("pruned", "pruned-cli", "distilled", "elastic", "qwen3-moe-student"):
        pickles = [p.name for p in (work / folder).rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
        assert not pickles, (folder, pickles)
    # the runs did what the prose says
    assert namespace["eval_loss"](namespace["student"]) < namespace["pruned_loss"]  # distillation recovered
    assert namespace["plan"].repo_id == "your-name/tiny-slim-moe"
    assert type(namespace["small"]).__name__ == "SlimMoeForCausalLM" and namespace["small"].config.hidden_size == 24
