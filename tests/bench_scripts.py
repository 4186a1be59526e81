"""Import a benchmark driver by its path: drivers live in ``benchmarks/``, outside the package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(relpath: str):
    """The module at ``ROOT/relpath`` (imported once, cached in ``sys.modules`` under its file stem)."""
    path = ROOT / relpath
    name = f"bench_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
