"""The package layout states the architecture: dependencies point one way, and every documented
``python -m megatron_let...`` command exists.

Groups: the LET core (top-level modules), ``teachers``, ``data``, ``integrations``, ``training``,
``evaluation``, ``experiments``, ``compat``. The core and the teachers never import a driver or a tool; ``compat`` (the
CPU redirections) is imported only by launchers, benchmarks and tests.
"""

import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "megatron_let")
CORE = "core"
# group -> groups it may import (besides itself)
ALLOWED = {
    CORE: {"teachers"},
    "teachers": {"errors", "data"},
    "data": set(),
    "preflight": {CORE, "teachers"},
    "integrations": {CORE, "teachers", "preflight"},
    "training": {CORE, "teachers", "data", "integrations", "preflight"},
    "evaluation": {"errors", "teachers"},
    "compat": set(),
    "experiments": {"data"},
}
COMPAT_LAUNCHERS = {"megatron_let.training.cli", "megatron_let.integrations.megatron_lm",
                    "megatron_let.integrations.selection"}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def group_of(module: str) -> str:
    """The subpackage a module belongs to; top-level modules are the core (``errors`` on its own)."""
    parts = module.split(".")
    if len(parts) >= 2 and os.path.isdir(os.path.join(PACKAGE, parts[1])):
        return parts[1]
    if module == "megatron_let.errors":
        return "errors"
    return CORE


def imports_of(path: str):
    """Every megatron_let module imported anywhere in the file (function-level imports included)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("megatron_let"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_let"):
            if node.module == "megatron_let" or os.path.isdir(os.path.join(ROOT, *node.module.split("."))):
                yield from (f"{node.module}.{a.name}" for a in node.names)
            else:
                yield node.module


def package_files():
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(directory, name)


def test_dependencies_point_one_way():
    violations = []
    for path in package_files():
        module = module_name(path)
        own = group_of(module)
        for imported in imports_of(path):
            if imported in ("megatron_let.LETConfig", "megatron_let.LateToEarlyTraining", "megatron_let.__version__"):
                imported = "megatron_let.controller"
            other = group_of(imported)
            if other == "compat" and own != "compat":
                if module not in COMPAT_LAUNCHERS:
                    violations.append(f"{module} imports {imported} (compat is for launchers and tests only)")
                continue
            assert own in ALLOWED, f"new folder megatron_let/{own}: state what it may import in ALLOWED"
            allowed = ALLOWED[own] | {own, "errors"}
            if own == "teachers" and imported == "megatron_let.config":
                continue  # the flag names of LETConfigError messages
            if own == "compat" and imported == "megatron_let.megatron_versions":
                continue  # the version facts its redirections apply to
            if other not in allowed:
                violations.append(f"{module} ({own}) imports {imported} ({other})")
    assert not violations, "\n".join(violations)


def test_layout_checker_catches_a_reverse_import(tmp_path):
    """The rule above can fail: a teacher module importing a driver is a violation."""
    assert group_of("megatron_let.teachers.huggingface") == "teachers"
    assert group_of("megatron_let.integrations.launch") == "integrations"
    assert "integrations" not in ALLOWED["teachers"] | {"teachers", "errors"}
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from megatron_let.integrations.launch import build_let\n")
    assert list(imports_of(str(bad))) == ["megatron_let.integrations.launch"]


def import_graph() -> dict:
    """module -> the megatron_let modules it imports (function-level imports included)."""
    modules = {module_name(path): path for path in package_files()}
    graph = {}
    for module, path in modules.items():
        targets = set()
        for imported in imports_of(path):
            while imported not in modules and "." in imported:  # a name inside a module or package
                imported = imported.rsplit(".", 1)[0]
            if imported in modules and imported != module and not module.startswith(imported + "."):
                targets.add(imported)  # (a package's own __init__ runs first anyway)
        graph[module] = targets
    return graph


def import_circles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circles():
    """Each module can be read after the ones it imports: no two modules import each other, even lazily."""
    assert import_circles(import_graph()) == []


def test_only_the_version_module_reads_megatrons_version():
    """What differs between Megatron versions is data in megatron_let/megatron_versions.py: no other module reads
    megatron's version (its ``__version__`` or ``package_info``); megatron-let's own ``__version__`` aside."""
    readers = []
    for path in package_files():
        if module_name(path) == "megatron_let.megatron_versions":
            continue
        for number, line in enumerate(open(path, encoding="utf-8"), 1):
            if ("__version__" in line or "package_info" in line) and line.strip() != '__version__ = "0.1.0"':
                readers.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not readers, "\n".join(readers)


def test_circle_finder_finds_a_circle():
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def documentation_sources():
    """The README, docs/*.md, and every example, benchmark and package file (their docstrings)."""
    sources = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "patches", "README.md")]
    for folder in ("docs", "examples", "benchmarks", "megatron_let"):
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            sources += [os.path.join(directory, f) for f in files
                        if f.endswith((".md", ".sh", ".sbatch", ".flags", ".yaml", ".py"))]
    return sources


def documented_commands():
    """Every ``python -m megatron_let...`` module named in the documentation."""
    found = set()
    for path in documentation_sources():
        found |= set(re.findall(r"python3? -m (megatron_let[\w.]*)", open(path, encoding="utf-8").read()))
    return sorted(found)


def documented_scripts():
    """Every ``python benchmarks/X.py`` / ``python examples/X.py`` (or under torchrun) in the README and docs/*.md."""
    docs = os.path.join(ROOT, "docs")
    found = set()
    for path in [os.path.join(ROOT, "README.md")] + [os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md")]:
        text = open(path, encoding="utf-8").read()
        found |= set(re.findall(r"(?:python3?|torchrun(?: --nproc[-_]per[-_]node[ =]?\d+)?) ((?:benchmarks|examples)/\w+\.py)", text))
    return sorted(found)


def test_documented_commands_are_found():
    assert {"megatron_let.teachers.smollm2", "megatron_let.teachers.megatron_checkpoint",
            "megatron_let.integrations.patching", "megatron_let.evaluation.downstream"} <= set(documented_commands())


@pytest.mark.parametrize("module", documented_commands())
def test_documented_command_runs(module):
    run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage" in run.stdout.lower()


def test_documented_scripts_are_found():
    assert {"examples/quickstart.py", "benchmarks/convergence.py", "benchmarks/overhead.py"} <= set(documented_scripts())


@pytest.mark.parametrize("script", documented_scripts())
def test_documented_script_runs(script):
    """Every script the README and docs/*.md tell you to run exists and answers --help."""
    run = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage" in run.stdout.lower()


def _anchors(path):
    """GitHub's heading anchors of a markdown file (lower case, punctuation dropped, spaces to hyphens)."""
    text, fence, found = open(path, encoding="utf-8").read(), False, set()
    for line in text.splitlines():
        fence ^= line.startswith("```")
        if not fence and line.startswith("#"):
            found.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return found


def test_documentation_links_resolve():
    """Every relative link in the README and docs/*.md names an existing file and, with #, a heading in it."""
    docs = os.path.join(ROOT, "docs")
    pages = [os.path.join(ROOT, "README.md")] + [os.path.join(docs, f) for f in sorted(os.listdir(docs)) if f.endswith(".md")]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", open(page, encoding="utf-8").read()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
            if not os.path.exists(path):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such file)")
            elif anchor and path.endswith(".md") and anchor not in _anchors(path):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
