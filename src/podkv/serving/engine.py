"""Start a vLLM engine on a PoD model: plan checks first, then ``vllm.LLM`` with the plan attached.

The plan reaches vLLM in one of two ways, both ending in ``hf_config.pod_plan``:
``hf_overrides`` built by :func:`pod_hf_overrides` (no files written), or a checkpoint whose
``config.json`` carries it (:mod:`podkv.serving.checkpoint`), which vLLM's OpenAI server can load.
"""

from __future__ import annotations

from pathlib import Path

from podkv.errors import PodError
from podkv.plan import SharingPlan
from podkv.serving.checkpoint import load_hf_config, pod_hf_overrides, write_pod_checkpoint  # noqa: F401
from podkv.serving.checks import KV_LAYOUTS, plan_for_serving


def make_llm(model_dir: str | Path, plan: SharingPlan | None = None, kv_layout: str | None = None, **llm_kwargs):
    """A ``vllm.LLM`` for ``model_dir`` served with ``plan`` (None: the plan in its config.json).

    ``kv_layout``: "shared" (default: the stage-2 memory saving) or "full" (stage 1, every layer keeps
    a full K/V cache). Defaults suited to the CPU build: ``enforce_eager=True``. Any ``llm_kwargs``
    go to ``vllm.LLM``.
    """
    import vllm  # optional: vllm

    config = load_hf_config(model_dir)
    if plan is None:
        plan_for_serving(config)
    else:
        overrides = dict(llm_kwargs.pop("hf_overrides", None) or {})
        llm_kwargs["hf_overrides"] = {**overrides, **pod_hf_overrides(plan, config)}
    if kv_layout is not None:
        if kv_layout not in KV_LAYOUTS:
            raise PodError(f"kv_layout={kv_layout!r}: expected one of {KV_LAYOUTS}")
        llm_kwargs["hf_overrides"] = {**(llm_kwargs.get("hf_overrides") or {}), "pod_kv_layout": kv_layout}
    llm_kwargs.setdefault("enforce_eager", True)
    return vllm.LLM(model=str(model_dir), **llm_kwargs)
