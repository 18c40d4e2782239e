"""DESIGN.md's layout rule: jaxserve/engine and jaxserve/server never import jax (the host side
runs without the device libraries). Every module of both packages, imported in a fresh process."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(package: str) -> list[str]:
    path = os.path.join(ROOT, *package.split("."))
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules([path])]


@pytest.mark.parametrize("package", ["jaxserve.engine", "jaxserve.server"])
def test_every_module_imports_without_jax(package):
    modules = _modules(package)
    assert len(modules) >= 5, modules  # the packages were found
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib')))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, f"{package} imported jax: {r.stdout}{r.stderr[-2000:]}"
