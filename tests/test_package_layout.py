"""The package layout states the architecture: dependencies point one way, and every documented
``python -m megatron_let...`` command exists.

Groups: the base (errors, flags, version facts, patch registry: importable from anywhere, importing nothing
else), the LET core (the other top-level modules: controller, driver, resume), ``loss`` (the alignment loss and
its placement), ``weight`` (lambda and stop policies), ``teachers``, ``data``, ``integrations`` (the Megatron
side), ``preflight``, ``training``, ``evaluation``, ``compat``. The core, the loss, the weight
and the teachers never import a driver or a tool; ``compat`` (the CPU redirections) is imported only by
launchers, benchmarks and tests.
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
BASE = "base"  # what every group may import: the errors, the flags, the version facts, the patch registry
BASE_MODULES = {"megatron_let.errors", "megatron_let.config", "megatron_let.megatron_versions",
                "megatron_let.patch_registry"}
# group -> groups it may import (besides itself and the base)
ALLOWED = {
    CORE: {"loss", "weight", "teachers"},
    "loss": set(),
    "weight": {"loss"},
    "teachers": {"data"},
    "data": set(),
    "preflight": {CORE, "teachers"},
    "integrations": {CORE, "loss", "weight", "teachers", "preflight"},
    "training": {CORE, "loss", "weight", "teachers", "data", "integrations", "preflight"},
    "evaluation": {"teachers"},
    "compat": set(),
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
    if module in BASE_MODULES:
        return BASE
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
            if other == BASE:
                continue
            if own == BASE:  # the base imports nothing else of the package
                violations.append(f"{module} (base) imports {imported} ({other})")
                continue
            assert own in ALLOWED, f"new folder megatron_let/{own}: state what it may import in ALLOWED"
            if other not in ALLOWED[own] | {own}:
                violations.append(f"{module} ({own}) imports {imported} ({other})")
    assert not violations, "\n".join(violations)


def test_layout_checker_catches_a_reverse_import(tmp_path):
    """The rule above can fail: a teacher module importing a driver is a violation."""
    assert group_of("megatron_let.teachers.huggingface") == "teachers"
    assert group_of("megatron_let.integrations.launch") == "integrations"
    assert "integrations" not in ALLOWED["teachers"] | {"teachers"}
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


# -- Megatron versions are compared in one module ----------------------------------------------------------------
VERSION_MODULES = {"megatron_let.megatron_versions", "megatron_let.patch_registry"}  # the registry passes data
# TEMPORARY (issue 33): being rewritten now to use registry entries / megatron_versions facts; whoever finishes
# that empties this set (the test below fails once a listed module has no probe left). Never add to it.
PENDING = set()  # modules still probing versions: none
VERSION_READERS = {"core_version", "imported_core_version", "version_in_directory", "parse", "_release"}
SCRIPT_NAMES = {"script", "pretrain_gpt", "pretrain_hybrid"}  # a Megatron-LM script module, by convention
VERSION_STRING = re.compile(r"\d+\.\d+(\.\d+)?([a-z+][\w.+]*)?")


def _name(node):
    """The root name of ``a.b(c)[d]`` (``a``); for a call, of what is called."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _called(node):
    func = node.func if isinstance(node, ast.Call) else None
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _is_version_literal(node) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return VERSION_STRING.fullmatch(node.value) is not None
    return (isinstance(node, ast.Tuple) and 2 <= len(node.elts) <= 3 and node.elts[0].__dict__.get("value") == 0
            and all(isinstance(e, ast.Constant) and type(e.value) is int for e in node.elts))  # Megatron's (0, 18)


def version_probes(path: str) -> list:
    """Where a file compares Megatron versions or probes Megatron for what a version has ("file:line: code").

    The rule: (1) a call of ``in_versions``; (2) a comparison with a version literal ("0.19", (0, 18); not
    ``sys.version_info``) or with a call of a version reader (``core_version()``...); (3) ``hasattr(X, ...)``,
    ``getattr(X, ..., default)`` or ``signature(X)`` where X is Megatron's: a name imported from ``megatron``,
    bound to ``import_module(...)`` or such a call itself, a script module (``script``, ``pretrain_gpt``...),
    a parameter of a ``@register_patch`` function (LET's own ``let_*`` flags on Megatron's args aside);
    (4) ``hasattr``/``getattr(.., default)`` of a private name (``_x``) on any object but ``self``/``cls`` or a
    dunder (Python's own: ``megatron.__path__``)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    megatron = set(SCRIPT_NAMES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            megatron |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "megatron"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "megatron":
            megatron |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Assign) and _called(node.value) == "import_module":
            megatron |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                _called(d) == "register_patch" for d in node.decorator_list):
            megatron |= {a.arg for a in node.args.args}

    def megatrons(node) -> bool:
        return _called(node) == "import_module" or _name(node) in megatron

    found = []
    for node in ast.walk(tree):
        probe = False
        if isinstance(node, ast.Call):
            called, args = _called(node), node.args
            if called == "in_versions":
                probe = True
            elif called == "signature" and args:
                probe = megatrons(args[0])
            elif (called == "hasattr" and len(args) == 2) or (called == "getattr" and len(args) == 3):
                private = isinstance(args[1], ast.Constant) and str(args[1].value).startswith("_") \
                    and not str(args[1].value).startswith("__")
                python_own = _name(args[0]) in ("self", "cls") or (
                    isinstance(args[0], ast.Attribute) and args[0].attr.startswith("__"))
                lets_own = isinstance(args[1], ast.Constant) and str(args[1].value).startswith("let_")  # a flag
                probe = not lets_own and (megatrons(args[0]) or (private and not python_own))
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            probe = any(_is_version_literal(o) or _called(o) in VERSION_READERS for o in operands) and \
                not any("version_info" in ast.unparse(o) for o in operands)
        if probe:
            found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_only_the_version_module_compares_megatron_versions():
    """What differs between Megatron versions is data: an entry's since/until (megatron_let/patch_registry.py) or
    a named fact in megatron_let/megatron_versions.py. No other module compares versions or probes Megatron for
    a version's names (version_probes says how that is recognised)."""
    found = {module_name(path): version_probes(path) for path in package_files()
             if module_name(path) not in VERSION_MODULES}
    probes = [probe for module, lines in sorted(found.items()) if module not in PENDING for probe in lines]
    assert not probes, "make each an entry's since/until or a fact in megatron_versions.py:\n" + "\n".join(probes)
    assert not [module for module in PENDING if not found.get(module)], "remove it from PENDING (no probe left)"


def test_version_probe_rule_catches_the_probes(tmp_path):
    """The rule above can fail: each kind of probe it names is found, and ordinary attribute reads are not."""
    bad = tmp_path / "bad.py"
    bad.write_text("""import importlib, sys
from megatron.training import initialize
from megatron_let.megatron_versions import core_version, in_versions
def f(script, optimizer, args, chunk, version):
    probes = [hasattr(initialize, "fused_kernels"),
              getattr(script, "gpt_builder", None),
              getattr(importlib.import_module("megatron.training"), "inprocess_restart", None),
              hasattr(optimizer, "_init_optimizer_states_with_dummy_values"),
              core_version() >= "0.18",
              in_versions(until="0.18"),
              version < (0, 18)]
    fine = [getattr(initialize.get_args(), "let_teacher", None), getattr(args, "x", None),
            hasattr(chunk, "module"), getattr(script, "get_batch"), sys.version_info >= (3, 12),
            hasattr(sys.modules["megatron"].__path__, "_recalculate"), getattr(self, "_x", None) if args else 0]
""")
    assert [int(line.split(":")[1]) for line in version_probes(str(bad))] == [5, 6, 7, 8, 9, 10, 11]


def test_cpu_patches_resolve_on_this_megatron():
    """Every entry of cpu-core (and cpu-training where megatron.training imports) fits this megatron-core: its
    target exists, or its version range excludes this version. A moved target fails here, by the entry's id."""
    import importlib.util

    from megatron_let import patch_registry
    from megatron_let.compat.cpu import enable_cpu_megatron

    enable_cpu_megatron()  # (only without CUDA) the triton stub megatron.training's import needs
    groups = ["cpu-core"]
    if importlib.util.find_spec("megatron.training") is not None:
        import megatron_let.compat.cpu_megatron_lm  # noqa: F401 - declares cpu-training

        groups.append("cpu-training")
    for group in groups:
        entries = patch_registry.patches(group)
        assert len(entries) > 10, group
        for entry in entries:
            assert entry.why and entry.id.startswith("cpu."), entry
            if entry.applies():
                entry.resolve()
    ids = [entry.id for entry in patch_registry.patches()]
    assert len(ids) == len(set(ids)), "an id is registered in two groups"


def test_a_patch_whose_target_moved_fails_naming_it(monkeypatch):
    """Every target of a group is resolved before the first is applied; a missing one is refused by its id,
    unless its version range excludes this megatron-core or it is optional."""
    from megatron_let import patch_registry

    monkeypatch.setitem(patch_registry._REGISTRY, "test-group", [])
    applied = []
    for name, target, until, optional in (("test.present", "megatron.core.utils:torch", None, False),
                                          ("test.old", "megatron.core.utils:gone_long_ago", "0.1", False),
                                          ("test.optional", "megatron.core.no_such_module:x", None, True)):
        patch_registry.register_patch(name, group="test-group", target=target, why="a test", until=until,
                                      optional=optional)(lambda module, context, name=name: applied.append(name))
    assert patch_registry.apply_patches("test-group") == 1 and applied == ["test.present"]
    patch_registry.register_patch("test.moved", group="test-group", target="megatron.core.utils:no_such_function",
                                  why="a test")(lambda module, context: applied.append("test.moved"))
    with pytest.raises(patch_registry.PatchTargetMissing,
                       match=r"patch test\.moved: megatron-core [\d.]+ has no megatron\.core\.utils:no_such_function"):
        patch_registry.apply_patches("test-group")
    assert applied == ["test.present"]  # nothing was applied the second time


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
