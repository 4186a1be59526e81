"""Every evaluation and model module imports on its own (a task module imported first once hit a circular
import), and loading a model never imports the training code."""

import pkgutil
import subprocess
import sys

import pytest

import podkv.eval
import podkv.models

MODULES = sorted(f"{pkg.__name__}.{m.name}" for pkg in (podkv.eval, podkv.models)
                 for m in pkgutil.iter_modules(pkg.__path__)) + ["podkv.texts"]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_model_loading_modules_do_not_import_training():
    """Adapted weights are applied by models/deltas.py and models/anchor_init.py: no trainer, no peft."""
    code = ("import sys, podkv, podkv.models.loading, podkv.models.adapted, podkv.cli; "
            "print([m for m in sys.modules if m.startswith('podkv.training') or m == 'peft'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
