"""``"smollm2-pod"``: the default model adapted to its shipped PoD plan by ``podkv train``.

The package ships only what training changed (LoRA factors of q/k projections, a few MB) with
the plan and the exact recipe; loading = default weights + deltas + ``enable_pod(plan)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from podkv.errors import PodError
from podkv.models.anchor_init import init_from_anchor
from podkv.models.deltas import apply_deltas
from podkv.models.enable import enable_pod
from podkv.plan import SharingPlan

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "smollm2-pod"
PLAN_FILE = "pod_plan.json"
DELTA_FILE = "pod_deltas.safetensors"
RECIPE_FILE = "recipe.json"


def load_adapted_default(dtype: torch.dtype = torch.float32, progress: bool = True, asset_dir: Path | None = None):
    """(model, tokenizer): SmolLM2-135M-Instruct + shipped PoD deltas, PoD enabled (``model.config.pod_plan``)."""
    from podkv.models.loading import load_model  # a cycle: load_model("smollm2-pod") dispatches here

    asset_dir = Path(asset_dir or ASSET_DIR)
    plan = adapted_plan(asset_dir)
    model, tok = load_model(None, dtype=torch.float32, progress=progress)
    adapt_weights(model, plan, asset_dir)
    enable_pod(model, plan)
    model.config._name_or_path = "smollm2-pod"  # results name the shipped model, not the base checkpoint
    model.to(dtype)
    return model.eval(), tok


def adapted_plan(asset_dir: Path):
    """The plan of an adapted-model folder (``pod_plan.json`` next to ``pod_deltas.safetensors``)."""
    for name in (PLAN_FILE, DELTA_FILE):
        if not (Path(asset_dir) / name).is_file():
            raise PodError(f"the adapted model in {asset_dir} is incomplete: {Path(asset_dir) / name} is missing; "
                           "reinstall podkv or train your own with `podkv train`")
    return SharingPlan.load(Path(asset_dir) / PLAN_FILE)


def adapt_weights(model, plan, asset_dir: Path, scale: float = 1.0, modules: tuple[str, ...] | None = None) -> None:
    """Base weights -> adapted weights, in place (fp32): replay the plan's init, add the stored deltas
    (times ``scale``; 1 is the trained model; ``modules``: only those modules' deltas, see ``apply_deltas``)."""
    init_from_anchor(model, plan, plan.meta.get("init", "none"))  # deterministic: replayed, not stored
    apply_deltas(model, Path(asset_dir) / DELTA_FILE, scale=scale, modules=modules)  # added in fp32, cast once


def carried_deltas(model: str | None) -> dict[str, torch.Tensor]:
    """The deltas a model loaded by name already carries over its base checkpoint: the shipped ones for
    ``"smollm2-pod"``, a ``podkv train`` folder's own; empty for a plain checkpoint. Training on top of such a
    model composes its deltas with these (:func:`podkv.models.deltas.compose_deltas`)."""
    from safetensors.torch import load_file

    if model == "smollm2-pod":
        path = ASSET_DIR / DELTA_FILE
    elif model and (Path(model) / DELTA_FILE).is_file():
        path = Path(model) / DELTA_FILE
    else:
        return {}
    return load_file(str(path))


def recipe(asset_dir: Path | None = None) -> dict:
    """How the shipped deltas were made: command, tokens, wall time, measured gaps."""
    path = Path(asset_dir or ASSET_DIR) / RECIPE_FILE
    if not path.is_file():
        raise PodError(f"{path} is missing")
    return json.loads(path.read_text())
