"""The package's layers hold: the library never imports the experiments, and ``nystrom.linalg`` never imports torch.

The library is every module of ``nystrom`` outside ``nystrom/experiments/``, except the command line
(``nystrom/__main__.py``), which runs the experiments. Both rules are checked statically, on every import statement
of every module (function-local ones included, relative ones resolved, and ``importlib.import_module`` or
``__import__`` of a literal name), and at run time, in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nystrom"
EXPERIMENTS = PACKAGE / "experiments"
COMMAND_LINE = PACKAGE / "__main__.py"
LIBRARY = sorted(p for p in PACKAGE.rglob("*.py") if EXPERIMENTS not in p.parents and p != COMMAND_LINE)
LINALG = [p for p in LIBRARY if PACKAGE / "linalg" in p.parents]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """Dotted name of the module at ``path`` in the package at ``root``."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(name: str, level: int, path: Path, root: Path) -> str:
    """``name`` imported with ``level`` leading dots from the module at ``path``, as an absolute name."""
    if not level:
        return name
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, absolute name)`` of everything the module at ``path`` (in the package at ``root``) imports.

    ``from a import b`` yields both ``a`` and ``a.b`` (``b`` may be a submodule).
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node.module or "", node.level, path, root)
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) in (
                  "import_module", "__import__"))):
            name = node.args[0].value
            level = len(name) - len(name.lstrip("."))
            found.append((node.lineno, _absolute(name.lstrip("."), level, path, root)))
    return found


def violations(paths, forbidden: str, root: Path = PACKAGE) -> list[str]:
    """``file:line imports name`` for every import of ``forbidden`` or of one of its submodules (the most specific
    name per line: ``from nystrom.experiments import bench`` reports ``nystrom.experiments.bench``)."""
    found = {}
    for path in paths:
        for line, name in imported_modules(path, root):
            if name == forbidden or name.startswith(forbidden + "."):
                where = f"{path.relative_to(root.parent)}:{line}"
                found[where] = max(found.get(where, ""), name, key=len)
    return [f"{where} imports {name}" for where, name in found.items()]


def test_the_layers_are_not_empty():
    # An empty glob would make the checks below pass vacuously.
    assert len(LINALG) >= 5 and PACKAGE / "__init__.py" in LIBRARY
    assert any(PACKAGE / "torch" in p.parents for p in LIBRARY)
    assert not any(EXPERIMENTS in p.parents for p in LIBRARY)


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_never_imports_the_experiments(path):
    bad = violations([path], "nystrom.experiments")
    assert not bad, "the library must not depend on nystrom.experiments: " + "; ".join(bad)


@pytest.mark.parametrize("path", LINALG, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_linalg_never_imports_torch(path):
    bad = violations([path], "torch")
    assert not bad, "nystrom.linalg is array-API code and must not import torch: " + "; ".join(bad)


def test_the_static_check_sees_every_kind_of_import(tmp_path):
    fake = tmp_path / "nystrom"
    (fake / "torch").mkdir(parents=True)
    module = fake / "torch" / "mod.py"
    module.write_text(textwrap.dedent(
        """
        import importlib
        from ..experiments import bench
        from .. import experiments

        def later():
            import nystrom.experiments.demo
            importlib.import_module("nystrom.experiments.pretrained")
            importlib.import_module("..experiments", __name__)
        from nystrom.experimental import x  # a different name: allowed
        """
    ))
    found = violations([module], "nystrom.experiments", root=fake)
    assert sorted(found) == [f"nystrom/torch/mod.py:{line} imports nystrom.experiments{name}" for line, name in (
        (3, ".bench"), (4, ""), (7, ".demo"), (8, ".pretrained"), (9, ""))], found


def _run(probe):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(probe)], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr


def test_importing_the_library_loads_no_experiment_module():
    _run(
        """
        import importlib, pkgutil, sys
        import nystrom, nystrom.linalg, nystrom.torch

        for package in (nystrom.linalg, nystrom.torch):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                importlib.import_module(info.name)
        # The lazily imported model tools too.
        nystrom.fna, nystrom.capture_attention
        loaded = sorted(m for m in sys.modules if m == "nystrom.experiments" or m.startswith("nystrom.experiments."))
        assert not loaded, f"importing the library loaded {loaded}"
        """
    )


def test_linalg_runs_on_numpy_without_importing_torch():
    _run(
        """
        import sys
        import numpy as np
        import nystrom
        from nystrom.linalg.landmarks import STRATEGIES

        rng = np.random.default_rng(0)
        Q, K, V = (rng.standard_normal((2, 40, 8)) for _ in range(3))
        for s in STRATEGIES:
            nystrom.approximate(Q, K, V, strategy=s, num_landmarks=8, seed=0)
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        """
    )
