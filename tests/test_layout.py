"""The house's arrows, read from the code's own imports (ast): they go one way.

    data          imports nothing of cstep
    engine core   (engine/, without engine/app/ and __main__) imports only the engine core
    nets          imports the engine core
    solvers       imports the engine core
    engine.app    imports everything; nothing outside it imports it

No cycle between these layers, none between modules, and no function-level import of cstep's own
packages (the one exception the layout allows: none is needed, so none is allowed). The same graph
is drawn in the README's layout section.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("data", "engine", "nets", "solvers")

#: layer -> the layers it may import (besides itself)
ALLOWED = {
    "data": set(),
    "core": set(),
    "nets": {"core"},
    "solvers": {"core"},
    "app": {"core", "nets", "solvers", "data"},
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    top = module.split(".")[0]
    if top == "engine":  # python -m engine is the command line: application layer
        app = module in ("engine.app", "engine.__main__") or module.startswith("engine.app.")
        return "app" if app else "core"
    return top


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute module names an ``from ... import ...`` statement reaches."""
    if node.level:
        base = module.split(".")
        if not is_package:
            base = base[:-1]
        base = base[:len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # "from . import runfile" names a module; "from .x import f" names x
    return [f"{prefix}.{a.name}" for a in node.names] + [prefix]


def _imports():
    """(importer, imported module, line, at module level?) for every import of cstep's packages."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            module = _module_name(path)
            tree = ast.parse(path.read_text(), filename=str(path))
            top_level = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = _resolve(node, module, path.name == "__init__.py")
                else:
                    continue
                for name in names:
                    if name.split(".")[0] in PACKAGES:
                        found.append((module, name, f"{path.relative_to(REPO)}:{node.lineno}", id(node) in top_level))
    return found


def _existing(name: str, modules: set[str]) -> str | None:
    """The module a dotted name refers to (``engine.app.runfile.load_run`` -> ``engine.app.runfile``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


@pytest.fixture(scope="module")
def graph():
    modules = {_module_name(p) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return modules, _imports()


def test_arrows_go_one_way(graph):
    modules, imports = graph
    wrong = []
    for importer, name, where, _ in imports:
        target = _existing(name, modules)
        if target is None:
            continue
        src, dst = _layer(importer), _layer(target)
        if src != dst and dst not in ALLOWED[src]:
            wrong.append(f"{where}: {importer} ({src}) imports {target} ({dst})")
    wrong = sorted(set(wrong))
    assert not wrong, "arrows in the wrong direction:\n" + "\n".join(wrong)


def test_no_function_level_imports_of_our_packages(graph):
    _, imports = graph
    hidden = sorted({f"{where}: {importer} imports {name.split('.')[0]}... inside a function"
                     for importer, name, where, top in imports if not top})
    assert not hidden, "\n".join(hidden)


def test_no_import_cycles_between_modules(graph):
    modules, imports = graph
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for importer, name, _, top in imports:
        target = _existing(name, modules)
        if top and target and target != importer and not importer.startswith(target + "."):
            edges[importer].add(target)
    # a package's __init__ importing its own submodules is how packages expose names: not a cycle
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_wrong_arrow(tmp_path, monkeypatch):
    """The rules are not vacuous: a core module importing the application layer is reported."""
    fake = ast.parse("from .app import runfile\n").body[0]
    names = _resolve(fake, "engine.model", is_package=False)
    assert "engine.app.runfile" in names
    assert _layer("engine.app.runfile") == "app" and "app" not in ALLOWED["core"]


#: the one long function the layout allows: the command line's table of options
LONG_FUNCTIONS_ALLOWED = {("engine/app/cli.py", "build_parser")}


def test_modules_and_functions_stay_readable():
    """No module over 500 lines, no function over 80 (the parser's option table aside)."""
    too_long = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            text = path.read_text()
            if len(text.splitlines()) > 500:
                too_long.append(f"{rel}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > 80 and (rel, node.name) not in LONG_FUNCTIONS_ALLOWED:
                        too_long.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)


def test_solvers_and_operators_do_not_dispatch_on_layer_types():
    """The layer contract decides, not isinstance(..., Dense/Conv2d); and the model's privates stay in engine/."""
    import re

    found = []
    for folder in ("solvers", "engine/curvature"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for k, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"isinstance\(.*\b(Dense|Conv2d)\b", line):
                    found.append(f"{path.relative_to(REPO)}:{k}: {line.strip()}")
    for folder in ("solvers", "nets", "data"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for k, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"model\._[a-z]", line):
                    found.append(f"{path.relative_to(REPO)}:{k}: {line.strip()}")
    assert not found, "\n".join(found)


def test_citations_resolve_inside_the_repository():
    """Every 'docs/kbfgs.md section N' / 'docs/complex-step.md section N' / 'pitfall N' in the code names a
    section or pitfall of docs/ (the notes the code was written from are not part of a clone)."""
    import re

    docs = {name: (REPO / "docs" / name).read_text() for name in ("kbfgs.md", "complex-step.md", "newton-krylov.md")}
    headings = {name: set(re.findall(r"^#+ (\d+(?:\.\d+)*)[. ]", text, flags=re.M)) for name, text in docs.items()}
    pitfalls = set(re.findall(r"^\*\*?(?:Pitfall )?(\d+)[.)]", docs["kbfgs.md"], flags=re.M))
    pitfalls |= set(re.findall(r"^(\d+)\. ", docs["kbfgs.md"][docs["kbfgs.md"].index("## 9."):], flags=re.M))
    bad = []
    for folder in ("engine", "solvers", "nets", "data", "benchmarks", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == pathlib.Path(__file__).resolve():
                continue  # this checker names the forms it looks for
            text = path.read_text()
            where = path.relative_to(REPO)
            if "shared/reference" in text:
                bad.append(f"{where}: cites ../shared/reference (not in the repository)")
            for name, number in re.findall(r"(kbfgs\.md|complex-step\.md|newton-krylov\.md),? (?:sections? )?(\d+(?:\.\d+)*)", text):
                if number not in headings[name] and number.split(".")[0] not in headings[name]:
                    bad.append(f"{where}: {name} section {number} does not exist")
                if not re.search(rf"docs/{re.escape(name)}", text):
                    bad.append(f"{where}: cites {name} without its docs/ path")
            for number in re.findall(r"pitfalls? (\d+)", text):
                if number not in pitfalls:
                    bad.append(f"{where}: pitfall {number} does not exist in docs/kbfgs.md")
    assert not bad, "\n".join(sorted(set(bad)))
