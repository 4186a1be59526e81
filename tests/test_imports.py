"""Every evaluation module imports on its own (a task module imported first once hit a circular import)."""

import pkgutil
import subprocess
import sys

import pytest

import podkv.eval

MODULES = sorted(f"podkv.eval.{m.name}" for m in pkgutil.iter_modules(podkv.eval.__path__)) + ["podkv.texts"]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
