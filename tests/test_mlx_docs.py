"""The doctests of every sapo_mlx module run (docstrings are equation-first with an example)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

pytest.importorskip("mlx.core")

import sapo_mlx

pytestmark = pytest.mark.mlx

MODULES = ["sapo_mlx"] + [f"sapo_mlx.{m.name}" for m in pkgutil.iter_modules(sapo_mlx.__path__)]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_public_api_is_documented_with_examples():
    for name in sapo_mlx.__all__:
        obj = getattr(sapo_mlx, name)
        if callable(obj):
            assert obj.__doc__ and ">>>" in obj.__doc__, name


def test_imports_no_other_framework():
    import subprocess
    import sys

    code = "import sys, sapo_mlx; print(sorted(m for m in ('torch', 'jax', 'tensorflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
