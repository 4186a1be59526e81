"""The machine and software a result was produced on, read from the running process.

A timing or a training run is only comparable with the machine it ran on, so every results file
(benchmark JSONs, eval results.json, the shipped adapter's recipe.json) records it through these two
functions rather than each writing its own description (one used to write a constant string).
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version


def machine(device: str | None = None) -> dict:
    """CPU, core count, torch threads and version; the GPU's name when ``device`` is CUDA (or, with
    ``device=None``, when one is visible)."""
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "machine": platform.machine(),
            "system": platform.system(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    if device is None and torch.cuda.is_available():
        device = "cuda"
    if device is not None and str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def versions(packages=("torch", "transformers", "kvpress")) -> dict:
    """podkv, Python and each package's installed version (None where it is not installed)."""
    import podkv

    out = {"podkv": podkv.__version__, "python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
