"""The module layout stays walkable: no import circles, no import inside a function to dodge one, shared
modules never import a script, a script takes nothing but ``main`` from another script (nor hands the script
itself on), no function, class or constant is left unused, the ``module.function`` a docstring or comment points to
is there, the docs' lists of modules and test files hold those there are, every link to a section of the docs
finds it, and the oldest Python the README promises can install every release requirements.txt pins."""

from __future__ import annotations

import ast
import importlib.metadata
import io
import re
import tokenize
from pathlib import Path
from tokenize import COMMENT

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
MODULES = {path.stem: path for path in ROOT.glob("*.py")}
DOCUMENTED = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def parsed(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))


def is_script(tree: ast.Module) -> bool:
    """A script ends with ``if __name__ == "__main__":``."""
    return any(
        isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)
        for node in tree.body
    )


MODULE_AS_VALUE = "(the module itself, as a value)"


def local_imports(tree: ast.Module) -> list[tuple[str, list[str], bool]]:
    """(module, names taken from it, imported at module level) for every import of a project module.

    For ``import X`` the names are the attributes the module reads from X, and MODULE_AS_VALUE where X itself is
    handed on (``stages = (X,)``), since what is read from it then cannot be told."""
    found = []
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    bound = alias.asname or alias.name
                    reads = [
                        n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                    ]
                    used = {n.attr for n in reads if n.value.id == bound}
                    read_from = {id(n.value) for n in reads}
                    if any(
                        isinstance(n, ast.Name) and n.id == bound and id(n) not in read_from for n in ast.walk(tree)
                    ):
                        used.add(MODULE_AS_VALUE)
                    found.append((alias.name, sorted(used), id(node) in top_level))
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


def test_a_script_handed_on_as_a_value_is_seen() -> None:
    """``stages = (augment,)`` takes the whole module: what is read from it later cannot be told."""
    assert local_imports(ast.parse("import augment\nstages = (augment,)\n")) == [("augment", [MODULE_AS_VALUE], True)]
    assert local_imports(ast.parse("import augment as a\na.main()\n")) == [("augment", ["main"], True)]


def test_the_pipeline_scripts_are_scripts() -> None:
    assert {"split_dataset", "augment", "train", "predict", "miou", "demo"} <= SCRIPTS
    assert not {"config", "net_structure", "data_preprocess", "inference", "runtime", "scene"} & SCRIPTS


def test_the_docs_name_every_module_and_test_file() -> None:
    """docs/architecture.md gives every module of the project a line of its own and docs/testing.md's table every
    test file a row, and neither keeps one for a file that is gone, so that neither page falls behind the code."""
    architecture = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    described = set(re.findall(r"^- `(\w+)\.py`:", architecture, re.M))
    unnamed = sorted(set(MODULES) - described)
    assert not unnamed, f"docs/architecture.md: add a line for each of {unnamed}"
    gone = sorted(described - set(MODULES))
    assert not gone, f"docs/architecture.md: remove the lines of {gone}, which are no longer modules"
    rows = set(re.findall(r"^\| `(test_\w+\.py)` \|", (ROOT / "docs" / "testing.md").read_text(encoding="utf-8"), re.M))
    tests = {path.name for path in (ROOT / "tests").glob("test_*.py")}
    missing = sorted(tests - rows)
    assert not missing, f"docs/testing.md: add a row to the table of test files for each of {missing}"
    gone = sorted(rows - tests)
    assert not gone, f"docs/testing.md: remove the rows of {gone}, which are no longer test files"


def heading_anchor(heading: str) -> str:
    """The anchor a Markdown heading gets on GitHub: lower case, punctuation dropped, spaces made hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_to_a_section_of_the_docs_finds_it() -> None:
    """Each ``[text](file.md#anchor)`` or ``[text](#anchor)`` of README.md and docs/ names a heading there."""
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*\.md)?#([^)\s]+)\)", page.read_text(encoding="utf-8")):
            linked = page.parent / target if target else page
            text = linked.read_text(encoding="utf-8") if linked.is_file() else ""
            if anchor not in {heading_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}:
                broken.append(f"{page.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, f"links to sections that are not there: {broken}"


def test_the_readme_python_installs_every_pinned_release() -> None:
    """The "With Python X.Y or newer" of README.md meets the Requires-Python of every release requirements.txt
    pins with ``==`` for that Python (its environment marker, if any, evaluated there), read from the installed
    package where it is that release, so the quick start installs."""
    promise = re.search(r"With Python (\d+\.\d+) or newer", (ROOT / "README.md").read_text(encoding="utf-8"))
    assert promise, "README.md: expected a line 'With Python X.Y or newer'"
    too_old = []
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        text = line.split(" #")[0].strip()
        if not text or text.startswith(("#", "-")):
            continue
        requirement = Requirement(text)
        pinned = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if not pinned or (requirement.marker and not requirement.marker.evaluate({"python_version": promise[1]})):
            continue
        try:
            installed = importlib.metadata.metadata(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        requires = installed.get("Requires-Python") or ""
        if installed["Version"] == pinned[0] and not SpecifierSet(requires).contains(promise[1]):
            too_old.append(f"{text} requires Python {requires}")
    assert not too_old, (
        f"README.md promises Python {promise[1]}, but requirements.txt pins {too_old} for it: pin a release for "
        "that Python behind a python_version marker, or raise the promise"
    )


FILE_EXTENSIONS = {"py", "txt", "json", "md", "csv", "log", "lock", "tif", "png", "pth", "onnx", "gpkg", "geojson"}


def named_elsewhere(name: str, text: str) -> list[str]:
    """The ``module.function`` names a docstring or comment of module ``name`` gives that the module named does
    not define at its top level (file names such as metrics.json left aside)."""
    stale = []
    for module, attribute in re.findall(r"\b([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\b", text):
        if module not in MODULES or attribute in FILE_EXTENSIONS:
            continue
        tree = TREES[module]
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        defined |= {
            target.id
            for node in tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Name)
        }
        if attribute not in defined:
            stale.append(f"{name}.py names {module}.{attribute}")
    return stale


def test_the_functions_docstrings_and_comments_name_exist() -> None:
    """A docstring or comment that sends the reader to ``module.function`` names one that module defines: a
    function moved to another module takes its mentions with it."""
    stale = []
    for name, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        texts = [ast.get_docstring(node) or "" for node in ast.walk(TREES[name]) if isinstance(node, DOCUMENTED)]
        texts += [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == COMMENT]
        stale += named_elsewhere(name, "\n".join(texts))
    assert stale == []


def test_the_docstring_check_finds_a_moved_function() -> None:
    assert named_elsewhere("scene", "see predict.classes_from_probabilities") == [
        "scene.py names predict.classes_from_probabilities"
    ]
    assert named_elsewhere("scene", "inference.classes_from_probabilities, metrics.json") == []


def defined_names(node: ast.stmt) -> set[str]:
    """The names a top-level statement defines: a function, a class, or the constants of an assignment."""
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
    return set()


def unused_definitions(trees: dict[str, ast.Module]) -> list[str]:
    """The top-level functions, classes and constants (``main`` and dunders aside) that no module uses. A use names
    this module's own definition: its name read in its module outside its own statement, taken by ``from module
    import name``, or read as ``module.name`` after ``import module``; a same-named one of another module does not
    count."""
    used: set[tuple[str, str]] = set()
    for name, tree in trees.items():
        own = set().union(*(defined_names(node) for node in tree.body))
        bound = {}  # the name each ``import module`` binds -> the module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in trees:
                used.update((node.module, alias.name) for alias in node.names)
            elif isinstance(node, ast.Import):
                bound.update({alias.asname or alias.name: alias.name for alias in node.names if alias.name in trees})
        for top in tree.body:
            itself = defined_names(top)  # a function calling itself is not used by that
            for node in ast.walk(top):
                if isinstance(node, ast.Name) and node.id in own and node.id not in itself:
                    used.add((name, node.id))
                elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
                    used.add((bound[node.value.id], node.attr))
    return [
        f"{name}.py: {defined}"
        for name, tree in trees.items()
        for node in tree.body
        for defined in sorted(defined_names(node))
        if defined != "main" and not defined.startswith("__") and (name, defined) not in used
    ]


def test_the_dead_code_check_tells_same_named_functions_apart() -> None:
    """One module's call of its own ``write_table`` does not keep another module's ``write_table`` alive."""
    trees = {
        "a": ast.parse("def write_table(): pass\ndef helper(): pass\n"),
        "b": ast.parse("import a\ndef write_table(): pass\ndef other(): write_table()\na.helper()\n"),
        "c": ast.parse("from b import other\ndef again(): again()\nCODES = {0: 'none'}\nKEPT = 1\nX = KEPT\n"),
    }
    assert unused_definitions(trees) == ["a.py: write_table", "c.py: again", "c.py: CODES", "c.py: X"]


def test_every_function_is_called_by_the_project() -> None:
    """No dead code: each top-level function, class and constant of a module is used by some module, not by tests
    alone (a helper only a test needs lives in the test)."""
    assert unused_definitions(TREES) == []
