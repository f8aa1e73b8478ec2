"""Imports run one way, down the floors: pipeline -> stages -> pieces, with no cycle anywhere in src/."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rrhf"

# Floor of each module that is not a piece (floor 1). A module imports only modules on lower floors, and
# pieces import other pieces (without a cycle).
ENTRY = 3  # the pipeline, and the `evaluate` module wrapping evaluation
STAGE = 2  # one module per stage or method, called by the pipeline
FLOORS = {
    "pipeline": ENTRY,
    "metrics.perplexity.perplexity": ENTRY,
    "sampling": STAGE,
    "training": STAGE,
    "evaluation": STAGE,
    "ppo": STAGE,
    "tables": STAGE,
    "findings": STAGE,
    "techniques": STAGE,
    "humaneval.runs": STAGE,
    "judged_eval": STAGE,
    "humaneval.__main__": ENTRY,
}


def modules() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports (at any depth of its code)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        name = name.removesuffix(".__init__") if name != "__init__" else "__init__"
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rrhf"):
                base = node.module.removeprefix("rrhf").lstrip(".") or "__init__"
                for alias in node.names:  # `from rrhf import pipeline` names a module
                    candidate = f"{base}.{alias.name}" if base != "__init__" else alias.name
                    imported.add(candidate if (PACKAGE / f"{candidate.replace('.', '/')}.py").exists() else base)
            elif isinstance(node, ast.Import):
                imported |= {a.name.removeprefix("rrhf.") for a in node.names if a.name.startswith("rrhf.")}
        graph[name] = imported - {name}
    return graph


def test_no_import_cycle() -> None:
    graph = modules()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_imports_run_down_the_floors() -> None:
    graph = modules()
    assert set(FLOORS) <= set(graph), sorted(set(FLOORS) - set(graph))
    wrong = [
        f"{a} (floor {FLOORS.get(a, 1)}) imports {b} (floor {FLOORS.get(b, 1)})"
        for a, imported in graph.items()
        for b in imported
        if FLOORS.get(b, 1) > FLOORS.get(a, 1) or (FLOORS.get(b, 1) == FLOORS.get(a, 1) > 1)
    ]
    assert not wrong, "\n".join(wrong)
