"""The module layout stays walkable: no import circles, no import inside a function to dodge one, shared
modules never import a script, and a script takes nothing but ``main`` from another script."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def parsed(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))


def is_script(tree: ast.Module) -> bool:
    """A script ends with ``if __name__ == "__main__":``."""
    return any(
        isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)
        for node in tree.body
    )


def local_imports(tree: ast.Module) -> list[tuple[str, list[str], bool]]:
    """(module, names taken from it, imported at module level) for every import of a project module.

    For ``import X`` the names are the attributes the module reads from X."""
    found = []
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    bound = alias.asname or alias.name
                    used = sorted(
                        {
                            n.attr
                            for n in ast.walk(tree)
                            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == bound
                        }
                    )
                    found.append((alias.name, used, id(node) in top_level))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
            found.append((node.module, [a.name for a in node.names], id(node) in top_level))
    return found


TREES = {name: parsed(name) for name in MODULES}
SCRIPTS = {name for name, tree in TREES.items() if is_script(tree)}
GRAPH = {name: {module for module, _, _ in local_imports(tree)} for name, tree in TREES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as a list of modules, or [] when there is none (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_circles() -> None:
    assert find_cycle(GRAPH) == []


def test_project_modules_are_imported_at_the_top() -> None:
    inside = [(name, module) for name, tree in TREES.items() for module, _, top in local_imports(tree) if not top]
    assert inside == []


def test_shared_modules_never_import_a_script() -> None:
    wrong = [(name, module) for name in MODULES if name not in SCRIPTS for module in GRAPH[name] if module in SCRIPTS]
    assert wrong == []


def test_a_script_takes_only_main_from_another_script() -> None:
    helpers = [
        (name, module, taken)
        for name, tree in TREES.items()
        for module, taken, _ in local_imports(tree)
        if module in SCRIPTS and set(taken) - {"main"}
    ]
    assert helpers == []


def test_the_pipeline_scripts_are_scripts() -> None:
    assert {"split_dataset", "augment", "train", "predict", "miou", "demo"} <= SCRIPTS
    assert not {"config", "net_structure", "data_preprocess", "inference", "runtime", "scene"} & SCRIPTS


def test_the_docs_name_every_module_and_test_file() -> None:
    """docs/architecture.md names every module of the project and docs/testing.md's table every test file, so
    that neither page falls behind the code."""
    architecture = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    testing = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    unnamed = sorted(name for name in MODULES if f"`{name}.py`" not in architecture)
    assert not unnamed, f"docs/architecture.md: add a line for each of {unnamed}"
    tests = sorted(path.name for path in (ROOT / "tests").glob("test_*.py"))
    missing = [name for name in tests if f"| `{name}` |" not in testing]
    assert not missing, f"docs/testing.md: add a row to the table of test files for each of {missing}"
