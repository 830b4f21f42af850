"""No module of eksft or rl imports a module that imports it back, at any level (an import inside a function counts:
it only hides the cycle until that function runs). Read from the source with ast; nothing is imported."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("eksft", "rl")
KNOWN_CYCLES: list[set[str]] = []


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of PACKAGES (a package is its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``name`` imports anywhere in its source (relative imports resolved;
    ``from pkg import sub`` is the submodule ``pkg.sub`` when it is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found = set()
    for target in targets:
        while target and target not in modules:  # `import a.b.c` where c is a function or class: module a.b
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of ``graph`` with more than one module."""
    reach = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        reach[start] = seen
    components = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph}
    return sorted((set(c) for c in components if len(c) > 1), key=sorted)


def test_cycles_finds_strongly_connected_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_relative_function_level_and_submodule_imports():
    graph = import_graph()
    assert "eksft.eval.config" in graph["eksft.config"]           # from eksft.eval.config import EvalConfig
    assert "eksft.objectives.parts" in graph["eksft.objectives.registry"]  # from .parts import ...
    assert "eksft.stages" in graph["eksft.pipeline.execute"]        # inside a function
    assert "eksft.layout" in graph["eksft.report.data"]             # from eksft import layout (a submodule)


def test_no_module_imports_one_that_imports_it_back():
    found = [c for c in cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert found == [], f"import cycles: {found}"
