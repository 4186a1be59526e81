"""Start a vLLM engine on a PoD model: plan checks first, then ``vllm.LLM`` with the plan attached.

The plan reaches vLLM in one of two ways, both ending in ``hf_config.pod_plan``:
``hf_overrides`` built by :func:`pod_hf_overrides` (no files written), or a checkpoint whose
``config.json`` carries it (:func:`write_pod_checkpoint`), which ``vllm serve DIR`` can load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from podkv.errors import PodError
from podkv.io import atomic_write_text
from podkv.plan import SharingPlan
from podkv.serving.checks import check_plan_servable, pod_architecture


def load_hf_config(model_dir: str | Path):
    """The transformers config of a local checkpoint directory."""
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise PodError(f"--model {path}: no config.json there (vLLM serving needs a local HF checkpoint directory)")
    return AutoConfig.from_pretrained(path)


def check_model_and_plan(model_dir: str | Path, plan: SharingPlan):
    """Raise a :class:`PodError` unless ``plan`` can be served on ``model_dir``; returns the config."""
    config = load_hf_config(model_dir)
    check_plan_servable(plan, config)
    return config


def pod_hf_overrides(plan: SharingPlan, config) -> dict:
    """``hf_overrides`` for ``vllm.LLM``: the PoD architecture and the plan (checked here)."""
    check_plan_servable(plan, config)
    return {"architectures": [pod_architecture(config)], "pod_plan": plan.to_dict()}


def write_pod_checkpoint(model_dir: str | Path, plan: SharingPlan, out_dir: str | Path) -> Path:
    """Copy ``model_dir`` to ``out_dir`` with the plan and the PoD architecture in config.json.

    Weight files are hard-linked when possible (same file system), else copied.
    """
    src, out = Path(model_dir), Path(out_dir)
    config = check_model_and_plan(src, plan)
    if out.resolve() == src.resolve():
        raise PodError(f"--out {out} is the source checkpoint: choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            _link_or_copy(f, out / f.name)
    data = json.loads((src / "config.json").read_text())
    data.update(pod_hf_overrides(plan, config))
    atomic_write_text(out / "config.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_llm(model_dir: str | Path, plan: SharingPlan | None = None, kv_layout: str | None = None, **llm_kwargs):
    """A ``vllm.LLM`` for ``model_dir`` served with ``plan`` (None: the plan in its config.json).

    ``kv_layout``: "shared" (default: the stage-2 memory saving) or "full" (stage 1, every layer keeps
    a full K/V cache). Defaults suited to the CPU build: ``enforce_eager=True``. Any ``llm_kwargs``
    go to ``vllm.LLM``.
    """
    import vllm

    config = load_hf_config(model_dir)
    if plan is None:
        from podkv.serving.checks import plan_for_serving

        plan_for_serving(config)
    else:
        overrides = dict(llm_kwargs.pop("hf_overrides", None) or {})
        llm_kwargs["hf_overrides"] = {**overrides, **pod_hf_overrides(plan, config)}
    if kv_layout is not None:
        from podkv.serving.checks import KV_LAYOUTS

        if kv_layout not in KV_LAYOUTS:
            raise PodError(f"kv_layout={kv_layout!r}: expected one of {KV_LAYOUTS}")
        llm_kwargs["hf_overrides"] = {**(llm_kwargs.get("hf_overrides") or {}), "pod_kv_layout": kv_layout}
    llm_kwargs.setdefault("enforce_eager", True)
    return vllm.LLM(model=str(model_dir), **llm_kwargs)
