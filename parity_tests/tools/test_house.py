"""The house rules, measured on the source (docs/architecture.md): who may import whom, no import circle, no
script importing another or editing `sys.path`, no source or test file over 400 lines, the twins' files the same on
both sides, no issue numbers in code.

Imports are read with `ast` (module level and inside functions alike: a lazy import is still an arrow), so the
check needs no framework and runs in a second."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..support.common import ROOT

PACKAGES = ("shared_config", "jax_model", "torch_model", "scripts", "bench")
# Which top-level packages each may import (besides itself). The core is framework-neutral and never reaches up;
# the twins mirror each other and share only the core; the tools (scripts/, bench/) sit on top.
MAY_IMPORT = {
    "shared_config": set(),
    "jax_model": {"shared_config"},
    "torch_model": {"shared_config"},
    "scripts": {"shared_config", "jax_model", "torch_model"},
    "bench": {"shared_config", "jax_model", "torch_model"},
}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    """Every non-test source module: {dotted name: path}."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = sources()


def is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The repo modules one import statement reads, e.g. `from shared_config import layout` in `jax_model.x` ->
    ["shared_config.layout"] when that is a module, else ["shared_config"]. A bare `import runners` in a script
    resolves to its sibling file (what a `sys.path` edit would make importable)."""
    if isinstance(node, ast.Import):
        bases, names = [a.name for a in node.names], [[] for _ in node.names]
    else:
        if node.level:
            package = importer if is_package(importer) else importer.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = ".".join(p for p in (package, node.module) if p)
        else:
            base = node.module or ""
        bases, names = [base], [[a.name for a in node.names]]
    found = []
    for base, imported in zip(bases, names):
        if base.split(".")[0] not in PACKAGES:
            sibling = f"{importer.rpartition('.')[0]}.{base}"  # `import runners` beside bench/compare.py
            if importer.count(".") == 1 and sibling in MODULES:
                found.append(sibling)
            continue
        subs = [f"{base}.{n}" for n in imported if f"{base}.{n}" in MODULES]
        found += subs if subs and len(subs) == len(imported) else [base] + subs
    return [m for m in found if m in MODULES or m.split(".")[0] in PACKAGES]


def imports_of(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return {m for n in nodes for m in resolve(name, n)} - {name}


GRAPH = {name: imports_of(name) for name in MODULES}


def is_script(name: str) -> bool:
    return "__main__" in MODULES[name].read_text() and name.split(".")[0] in ("scripts", "bench")


def test_no_arrow_points_up_or_across():
    """The core imports no twin and no tool; a twin imports only the core; the tools import the core and twins."""
    bad = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in sorted(targets)
           if (top := b.split(".")[0]) != a.split(".")[0] and top not in MAY_IMPORT[a.split(".")[0]]]
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_the_core_names_a_twin_only_for_the_tools():
    """shared_config/twins.py is the one place the core names a twin, by string, so that every tool answers
    "JAX or PyTorch?" the same way and starts one framework; no core module calls it, and nothing else in the
    core imports a module by name."""
    by_name = [name for name, path in MODULES.items()
               if name.startswith("shared_config") and "import_module" in path.read_text()]
    assert by_name == ["shared_config.twins"], by_name
    users = [a for a, targets in GRAPH.items() if "shared_config.twins" in targets and a.startswith("shared_config")]
    assert not users, users


def test_no_import_circle():
    """Imports form a DAG (a package's `__init__` re-exporting its own modules is not a circle: only arrows that
    leave the importer's own package, or that point at a module rather than a package, count)."""
    def edges(a):
        return {b for b in GRAPH[a] if not (is_package(b) and (a + ".").startswith(b + "."))}

    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges(node)):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_script_imports_another_and_nothing_edits_sys_path():
    """Scripts are thin: what two commands share is library code, and imports resolve without `sys.path` edits."""
    bad = [f"{a} imports the script {b}" for a, targets in GRAPH.items() for b in sorted(targets) if is_script(b)]
    bad += [f"{name} edits sys.path" for name, path in MODULES.items()
            if re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*=", path.read_text())]
    assert not bad, "\n".join(bad)


def test_no_source_file_over_400_lines():
    """The library and the tools, and the tests too: a test file that outgrows the limit is split by what it tests."""
    files = [*MODULES.values(), *sorted((ROOT / "parity_tests").rglob("*.py"))]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_the_twins_never_replace_a_named_tuple_field():
    """torch 2.11's dynamo (the GPU image's torch) returns an empty tuple from a compiled NamedTuple `_replace`;
    compiled decoding then failed at its next step with an internal error. The caches are rebuilt with their
    constructors (CI's torch 2.13 compiles either; test_kv_cache.py compiles the decode step). The JAX twin mirrors
    it."""
    bad = [f"{p.relative_to(ROOT)}:{i}" for twin in ("torch_model", "jax_model")
           for p in sorted((ROOT / twin).glob("*.py"))
           for i, line in enumerate(p.read_text().splitlines(), 1) if "._replace(" in line]
    assert not bad, "\n".join(bad)


def test_the_twins_hold_the_same_files():
    """The twins mirror each other file for file (docs/architecture.md): a module added to one twin alone fails here.
    That the names and their order inside agree is what `diff jax_model/X.py torch_model/X.py` shows a reviewer."""
    files = {twin: sorted(p.name for p in (ROOT / twin).glob("*.py")) for twin in ("jax_model", "torch_model")}
    assert files["jax_model"] == files["torch_model"], files


@pytest.mark.parametrize("folder", [*PACKAGES, "parity_tests"])
def test_no_issue_numbers_in_code(folder):
    """Code says why, not which ticket: an issue number is meaningless to a reader of a fresh clone."""
    pattern = re.compile(r"\bissues? ?#?\d+", re.IGNORECASE)
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / folder).rglob("*.py"))
           for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not bad, "\n".join(bad)


def test_ruff_lint_is_clean():
    """`ruff check` (configured in pyproject.toml: 120 columns, pycodestyle errors and warnings, pyflakes) passes on the
    whole repository, so long lines, unused imports and undefined names do not creep back. No cache: the checkout
    stays untouched."""
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(ROOT)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_checker_sees_what_it_is_meant_to_see():
    """The resolver finds absolute, relative, package-level and sibling imports, and a lazy one inside a function,
    so the rules above are not vacuous."""
    def found(importer, code):
        return sorted({m for n in ast.walk(ast.parse(code)) if isinstance(n, (ast.Import, ast.ImportFrom))
                       for m in resolve(importer, n)})

    assert found("scripts.x", "from jax_model.gla import chunked_gla") == ["jax_model.gla"]
    assert (found("jax_model.x", "from .gla import GLA\nfrom shared_config import layout")
            == ["jax_model.gla", "shared_config.layout"])
    assert found("shared_config.x", "def f():\n    import torch_model") == ["torch_model"]
    assert found("bench.compare", "import runners") == ["bench.runners"]
    assert "shared_config" in GRAPH["jax_model.model"] and "shared_config.placement" in GRAPH["jax_model.model"]
    assert any(is_script(m) for m in MODULES) and not is_script("shared_config.layout")
