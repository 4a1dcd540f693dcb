"""The house rules of docs/architecture.md, checked on the source: imports point inward, the import
graph has no cycle, files stay small.

The graph is read from the source with :mod:`ast`, not by importing: an edge ``a -> b`` is any
``import``/``from … import`` of lorakit module ``b`` in module ``a``, at module level or inside a
function (a function-level import is still a dependency, only a hidden one). Imports under
``if TYPE_CHECKING:`` are left out: they never run. Importing ``lorakit.x.y`` also runs the
package ``lorakit.x``'s ``__init__``; those implicit edges are left out too (the packages' lazy
tables name their submodules only as strings).

Where the tree still breaks a rule, the exception is listed here with its reason, and the same
list is in docs/architecture.md ("Known exceptions"): a new violation fails, and an exception that
has been fixed must be removed from both.
"""

from __future__ import annotations

import ast
import functools
import warnings
from pathlib import Path

import lorakit

SRC = Path(lorakit.__file__).resolve().parent
DOCS = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

LAYER_0 = {"lorakit.errors", "lorakit._fs", "lorakit._lazy"}

# Import cycles that remain, each with its reason (none today; docs/architecture.md lists the same ones).
ALLOWED_CYCLES: dict[frozenset[str], str] = {}

WARN_LINES, MAX_LINES = 400, 600
# Modules allowed over MAX_LINES, each with its reason (none today; docs/architecture.md too).
OVER_BUDGET: dict[str, str] = {}


def module_files(root: Path = SRC) -> dict[str, Path]:
    """Every module of the package under ``root``: dotted name -> file."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported_modules(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports anywhere, except under TYPE_CHECKING."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    visit_node(other)
                continue
            visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import module` is an edge to the module itself
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        visit(node)

    visit(ast.parse(source))
    return {m for m in found if m in known and m != name}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    files = module_files(root)
    return {name: imported_modules(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", set(files))
            for name, path in files.items()}


@functools.cache
def _lorakit_graph() -> dict[str, frozenset[str]]:
    return {name: frozenset(targets) for name, targets in import_graph().items()}


def lorakit_graph() -> dict[str, set[str]]:
    """lorakit's import graph (parsed once per test session; a fresh copy each call)."""
    return {name: set(targets) for name, targets in _lorakit_graph().items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _edges(graph: dict[str, set[str]], component: set[str]) -> str:
    return ", ".join(f"{a} -> {b}" for a in sorted(component) for b in sorted(graph[a] & component))


# The checker itself, on small trees: it must see function-level imports and skip TYPE_CHECKING ones.

def test_the_graph_sees_function_level_and_relative_imports_but_not_type_checking_ones(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
                              "def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\nimport os\n")
    (pkg / "c.py").write_text("import pkg.sub.b as b\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.sub": set(), "pkg.a": {"pkg.sub.b"}, "pkg.sub.b": {"pkg.a"},
                     "pkg.c": {"pkg.sub.b"}}
    assert cycles(graph) == [{"pkg.a", "pkg.sub.b"}]


def test_cycles_finds_each_component_once():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert sorted(map(sorted, cycles(graph))) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# The rules, on lorakit.

def test_the_import_graph_has_no_cycle_but_the_listed_exceptions():
    graph = lorakit_graph()
    found = {frozenset(c) for c in cycles(graph)}
    new = [_edges(graph, set(c)) for c in found - ALLOWED_CYCLES.keys()]
    assert not new, f"import cycles (make one side import the other only): {new}"
    fixed = [sorted(c) for c in ALLOWED_CYCLES.keys() - found]
    assert not fixed, f"no longer cycles: remove them from ALLOWED_CYCLES and docs/architecture.md: {fixed}"


def test_adapters_import_nothing_of_lorakit_outside_adapters_but_layer_0():
    graph = lorakit_graph()
    bad = sorted(f"{a} -> {b}" for a, targets in graph.items() if _inside(a, "lorakit.adapters")
                 for b in targets if not (_inside(b, "lorakit.adapters") or b in LAYER_0))
    assert bad == []


def test_only_the_command_line_imports_commands():
    graph = lorakit_graph()
    bad = sorted(f"{a} -> {b}" for a, targets in graph.items()
                 if not (_inside(a, "lorakit.commands") or a == "lorakit.cli")
                 for b in targets if _inside(b, "lorakit.commands") or b == "lorakit.cli")
    assert bad == []


def test_serving_never_imports_training():
    graph = lorakit_graph()
    bad = sorted(f"{a} -> {b}" for a, targets in graph.items() if _inside(a, "lorakit.serve")
                 for b in targets if _inside(b, "lorakit.train"))
    assert bad == []


def function_level_imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a lorakit module inside a function of ``source``."""
    found = []
    for function in ast.walk(ast.parse(source)):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                names = ([node.module] if isinstance(node, ast.ImportFrom) and not node.level
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                found += [(node.lineno, n) for n in names if n == "lorakit" or (n or "").startswith("lorakit.")]
    return found


def test_function_level_imports_of_lorakit_only_in_the_command_line():
    # commands/ import inside run() so that `lorakit --help` stays instant; everywhere else the graph is
    # at the top of the module, where a reader (and this test's graph) sees it.
    bad = [f"{name}:{line} imports {module}" for name, path in module_files().items()
           if not (_inside(name, "lorakit.commands") or name == "lorakit.cli")
           for line, module in function_level_imports(path.read_text(encoding="utf-8"))]
    assert bad == []
    assert function_level_imports("def f():\n    from lorakit.x import y\n") == [(2, "lorakit.x")]


def test_the_exceptions_are_documented():
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("## Known exceptions"):]
    for component in ALLOWED_CYCLES:
        assert " ↔ ".join(f"`{m}`" for m in sorted(component)) in section
    for path in OVER_BUDGET:
        assert f"`{path}`" in section


def test_no_module_is_over_the_line_budget():
    sizes = {str(path.relative_to(SRC.parent)): len(path.read_text(encoding="utf-8").splitlines())
             for path in module_files().values()}
    over = {path: n for path, n in sizes.items() if n > MAX_LINES and path not in OVER_BUDGET}
    assert not over, f"over {MAX_LINES} lines (split out the concept hiding inside): {over}"
    fixed = [path for path in OVER_BUDGET if sizes.get(path, 0) <= MAX_LINES]
    assert not fixed, f"back under {MAX_LINES} lines: remove them from OVER_BUDGET: {fixed}"
    long = {path: n for path, n in sorted(sizes.items()) if n > WARN_LINES}
    if long:
        warnings.warn(f"{len(long)} module(s) over {WARN_LINES} lines: "
                      + ", ".join(f"{path} ({n})" for path, n in long.items()), stacklevel=1)


def test_an_upward_import_would_be_caught():
    # Not vacuous: one upward edge added to the real graph (adapters/lora -> inject) closes a cycle.
    graph = lorakit_graph()
    assert "lorakit.adapters.lora" in graph["lorakit.inject"]
    graph["lorakit.adapters.lora"] = graph["lorakit.adapters.lora"] | {"lorakit.inject"}
    assert any({"lorakit.adapters.lora", "lorakit.inject"} <= c for c in cycles(graph))


def renames(source: str) -> list[tuple[int, str]]:
    """``(line, call)`` of each call that puts a file in place: ``os.rename``/``os.replace``,
    ``shutil.move``, or a ``Path``'s ``.rename``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            call = f"{owner}.{node.func.attr}" if owner else f".{node.func.attr}"
            if call in ("os.rename", "os.replace", "shutil.move") or node.func.attr == "rename":
                found.append((node.lineno, call))
    return found


def test_files_are_put_in_place_only_by_the_atomic_write_helper():
    # One atomic-write helper (lorakit._fs): a rename anywhere else is a second copy of it.
    bad = [f"{name}:{line} calls {call}" for name, path in module_files().items() if name != "lorakit._fs"
           for line, call in renames(path.read_text(encoding="utf-8"))]
    assert bad == [], "write through lorakit._fs (atomic_write, atomic_folder, replace_folder)"
    assert renames("import os\nos.replace(a, b)\np.rename(q)\n'x'.replace('a', 'b')\n") == [
        (2, "os.replace"), (3, "p.rename")]
