"""The house rules of docs/architecture.md that a test can hold: no import circle, no crowded source file."""

import ast
import graphlib
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hf_slim", "trainers")
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import statement that runs (module or function level), skipping `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _imports(ast.Module(body=[child], type_ignores=[])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if name in packages else name.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                # `from pkg import sub` imports the submodule when there is one, else a name defined in pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # a name inside a module -> that module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 30 and graph["hf_slim.pruning.prune"]  # the walk found the package
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"import circle: {' -> '.join(error.args[1])}")


def test_no_source_file_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concern (limit {MAX_LINES} lines): {long}"


# docs/architecture.md's rooms, top to bottom: a module imports only rooms at or below its own.
ROOMS = (
    "hf_slim.cli", "hf_slim.demo", "trainers", "hf_slim.elastic", "hf_slim.pruning", "hf_slim.convert_streaming",
    "hf_slim.hub", "hf_slim.convert",
    "hf_slim.losses", "hf_slim.optim", "hf_slim.checkpoints", "hf_slim.anatomy", "hf_slim.integrations",
    "hf_slim.models",
)  # fmt: skip
# the deprecated CLI paths re-export from hf_slim.cli until they are removed
DEPRECATED_SHIMS = {"hf_slim.elastic.cli", "hf_slim.pruning.cli", "trainers.cli"}


def _room(module: str) -> int | None:
    return next((i for i, room in enumerate(ROOMS) if module == room or module.startswith(room + ".")), None)


def test_imports_point_down_the_rooms():
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if module not in DEPRECATED_SHIMS and _room(module) is not None
        for target in targets
        if _room(target) is not None and _room(target) < _room(module)
    ]
    assert not upward, f"imports against docs/architecture.md's order: {upward}"
