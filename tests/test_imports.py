"""The code's shape: no import cycle among pipeline/ and stages/ modules, and functions that fit on
a screen.

Both are read from the source (ast), so they need no imports and run in well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
MAX_BODY_LINES = 60



def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            out[name] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """Project modules a module imports anywhere (also inside functions), except under
    TYPE_CHECKING."""
    found: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pipeline import x`
        todo.extend(ast.iter_child_nodes(node))
    return {m for m in found if m in modules and m not in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(ast.parse(path.read_text()), modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_pipeline_or_stages():
    graph = _graph()
    assert {"pipeline.objective", "pipeline.decoding"} <= graph["pipeline.model"]  # in-method
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def long_functions(source: str, max_lines: int = MAX_BODY_LINES) -> dict[str, int]:
    """name -> body lines (docstring included) of each function or method longer than
    `max_lines`."""
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.body[0].lineno + 1
            if lines > max_lines:
                out[node.name] = lines
    return out


def test_long_function_finder_counts_body_lines():
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    assert long_functions(f"def f():\n{body}\n") == {"f": 61}
    assert long_functions(f"def f():\n{body}\n", max_lines=61) == {}


def test_no_function_longer_than_a_screen():
    too_long = {f"{path.relative_to(ROOT)}:{name}": n for path in _modules().values()
                for name, n in long_functions(path.read_text()).items()}
    assert not too_long, f"functions over {MAX_BODY_LINES} lines: {too_long}"
