"""The machine and software a result was produced on, read from the running process.

A timing or a training run is only comparable with the machine it ran on, so every results file
(benchmark JSONs, eval results.json, the shipped adapter's recipe.json) records it through these two
functions rather than each writing its own description (one used to write a constant string).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import torch

import podkv


def machine(device: str | None = None) -> dict:
    """CPU, core count, torch threads and version; the GPU's name when ``device`` is CUDA (or, with
    ``device=None``, when one is visible)."""
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
    out = {"podkv": podkv.__version__, "python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def identity(model, plan=None) -> dict:
    """What a result measured, so a figure can be traced and its labels derived from the file itself:
    the command line, the model (name and a hash of its weights as measured, e.g. smollm2-pod's
    adapted ones) and the plan (hash of its JSON, mode, and the lengths of its blocks).

    Why a weights hash: names drift ("the default model" was once the base weights, once adapted), the
    tensors do not. Hashing 135M fp32 parameters takes about half a second on CPU.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    out = {"argv": ["podkv" if i == 0 and a.endswith("podkv") else a for i, a in enumerate(sys.argv)],
           "model": {"name": getattr(model.config, "_name_or_path", "") or model.config.model_type,
                     "weights_sha256": digest.hexdigest(), "dtype": str(next(model.parameters()).dtype)}}
    if plan is not None:
        text = json.dumps(plan.to_dict(), sort_keys=True)
        lengths = sorted({b - a + 1 for h in range(plan.num_kv_heads) for a, b in plan.blocks(h)})
        out["plan"] = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "mode": plan.mode,
                       "block_lengths": lengths, "kv_saving_4096": plan.kv_saving(4096)}
    return out

