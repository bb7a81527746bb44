"""The house's rooms: adapter -> core <- worker -> mappings, arrows only pointing down, no circles.

Every import counts, the ones inside functions included: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("adapter", "core", "worker", "mappings")
#: What each room may import from the others.
ALLOWED = {
    "adapter": {"core", "mappings"},
    "worker": {"core", "mappings"},
    "core": {"mappings"},
    "mappings": set(),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ROOMS}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for room in ROOMS for p in (ROOT / room).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # "from pkg import mod" names a module when pkg.mod is one of ours, else an attribute of pkg.
        graph[name] = {imported for imported in _imports(path) if imported in modules and imported != name}
    return graph


def test_each_room_imports_only_the_rooms_below_it() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if target.split(".")[0] != module.split(".")[0]
        and target.split(".")[0] not in ALLOWED[module.split(".")[0]]
    )
    assert wrong == []


def test_no_import_circles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    # A package's __init__ importing its own submodules is not a circle worth naming; none exist today.
    assert circles == []


def test_the_graph_sees_lazy_imports() -> None:
    """The checks above would be empty promises if imports inside functions were missed."""
    graph = _graph()
    assert "worker.recovery" in graph["worker.tasks"]  # imported inside the recovery tasks
    assert "core.redis_client" in graph["core.jobs"]  # imported inside _broker_is_state_redis


def test_the_api_loads_no_model_or_worker_code() -> None:
    script = (
        "import sys; from adapter.app import create_app; create_app(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'worker')))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_command_has_the_worker_verbs_through_the_entry_point() -> None:
    from click.testing import CliRunner

    from adapter.cli import main

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for verb in ("serve", "subscribe", "worker", "demo", "predict", "evaluate", "extract", "train", "dlq"):
        assert f"  {verb} " in result.output
