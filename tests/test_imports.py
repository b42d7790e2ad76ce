"""Every module of the project imports on its own, and imports only in the allowed direction.

The modules are found by walking the packages' directories (never a hand-written list), so a new module is covered
the day it is added. Each one is imported first in a fresh interpreter of its own: an import cycle or a module that
only works when something else was imported before it fails here, whatever order the other tests happen to use.

The import rule (docs/architecture.md): cli -> jobs (distill.extract, distill.student) -> distill.data / codec /
teachers (and distill.synth, which builds on distill.data) -> ci_store. Checked on the source with `ast`,
function-local imports included.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ci_store", "distill", "cli")


def _walk(top: str) -> dict[str, Path]:
    """module name -> file, for every .py file under the package `top` (a package is a folder with __init__.py)."""
    found = {}
    for d, dirs, files in os.walk(ROOT / top):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        here = Path(d)
        py = sorted(f for f in files if f.endswith(".py"))
        if py and not (here / "__init__.py").exists():
            raise AssertionError(f"{here.relative_to(ROOT)} holds Python files but has no __init__.py: "
                                 "its modules would not be part of the package")
        for f in py:
            parts = (here / f).relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = here / f
    return found


MODULES = {name: path for top in PACKAGES for name, path in _walk(top).items()}


def test_the_walk_finds_the_packages():
    assert set(PACKAGES) <= set(MODULES)
    # every subpackage of distill is a package with modules, so a renamed folder cannot drop out silently
    subpackages = {p.name for p in (ROOT / "distill").iterdir() if (p / "__init__.py").exists()}
    assert {"codec", "data", "extract", "student", "teachers"} <= subpackages
    for sub in subpackages:
        assert any(m.startswith(f"distill.{sub}.") for m in MODULES), sub


# A fresh interpreter that imports torch and numpy (third-party, the slow part of most imports: ~1 s of CPU each
# time), then forks one child per project module, a few at a time. Each child starts with no module of the project
# imported and imports its one module first; forking only saves re-importing torch 60 times on 2 cores. (What torch
# and numpy load is what any `import torch` loads, so preloading them hides no cycle or order bug between the
# project's own modules.)
_IMPORT_EACH_ALONE = r"""
import importlib, json, os, sys, traceback
import numpy, torch  # noqa: F401  (preloaded third-party only)

root, jobs, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ours = ("ci_store", "distill", "cli")
assert not [m for m in sys.modules if m.split(".")[0] in ours], "the parent imported part of the project"
results, running = {}, {}


def child(name):
    try:
        assert not [m for m in sys.modules if m.split(".")[0] in ours]
        mod = importlib.import_module(name)
        f = getattr(mod, "__file__", "") or ""
        assert f.startswith(root), f"{name} was imported from {f!r}, not from {root!r}"
        os._exit(0)
    except BaseException:
        sys.stderr.write(f"=== {name}\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)


def reap():
    pid, status = os.wait()
    results[running.pop(pid)] = os.waitstatus_to_exitcode(status)


for name in names:
    while len(running) >= jobs:
        reap()
    pid = os.fork()
    if pid == 0:
        child(name)
    running[pid] = name
while running:
    reap()
print(json.dumps(results))
"""


def _fresh_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = sorted(m for m in MODULES if not m.endswith(".__main__"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    p = subprocess.run([sys.executable, "-c", _IMPORT_EACH_ALONE, str(ROOT) + os.sep, str(cores), *names],
                       cwd=ROOT, env=_fresh_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    assert sorted(results) == names
    failed = sorted(n for n, rc in results.items() if rc != 0)
    assert not failed, f"modules that fail to import on their own: {failed}\n{p.stderr[-8000:]}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.endswith(".__main__")))
def test_main_modules_run(name):
    """Importing a __main__ module runs it: `python -m <package> --help` in a fresh interpreter."""
    p = subprocess.run([sys.executable, "-m", name.rsplit(".", 1)[0], "--help"], cwd=ROOT, env=_fresh_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "Usage" in p.stdout, p.stderr[-4000:]


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything `name` imports anywhere in its source (module level or inside functions).

    `from a.b import c` yields both a.b and a.b.c (c may be a submodule); relative imports are resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
    return out


# importer prefix -> prefixes it must not import
FORBIDDEN = {
    "ci_store": ("distill", "cli"),
    "distill.data": ("distill.extract", "distill.student", "distill.experiment", "distill.demo", "cli"),
    "distill.codec": ("distill.extract", "distill.student", "distill.experiment", "distill.demo", "cli"),
    "distill.teachers": ("distill.extract", "distill.student", "distill.experiment", "distill.demo", "cli"),
    "distill.synth": ("distill.extract", "distill.student", "distill.experiment", "distill.demo", "cli"),
    "distill.extract": ("cli",),
    "distill.student": ("cli",),
}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(name: str, path: Path) -> list[str]:
    banned = [b for layer, bs in FORBIDDEN.items() if _under(name, layer) for b in bs]
    return sorted(i for i in _imports(name, path) if any(_under(i, b) for b in banned))


def test_import_resolution_sees_relative_and_local_imports(tmp_path):
    pkg = tmp_path / "distill" / "data"
    pkg.mkdir(parents=True)
    src = pkg / "x.py"
    src.write_text("from . import audio\nfrom ..student import model\n"
                   "def f():\n    from distill.extract.job import run\n    import cli.main\n")
    assert _violations("distill.data.x", src) == ["cli.main", "distill.extract.job", "distill.extract.job.run",
                                                  "distill.student", "distill.student.model"]
    assert _imports("distill.data.x", src) >= {"distill.data", "distill.data.audio"}


@pytest.mark.parametrize("name", sorted(m for m in MODULES if any(_under(m, layer) for layer in FORBIDDEN)))
def test_imports_follow_the_layering(name):
    """cli -> distill.extract / distill.student -> distill.data / codec / teachers -> ci_store, never upwards."""
    bad = _violations(name, MODULES[name])
    assert not bad, f"{name} ({MODULES[name].relative_to(ROOT)}) imports {bad}: against the import rule"
