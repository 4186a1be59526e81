"""The ``vllm.general_plugins`` entry point: teach vLLM to serve PoD models.

vLLM calls :func:`register` once in every process it starts (front end, engine core, workers).
It registers, through vLLM's registries:

* ``PodLlamaForCausalLM`` with ``ModelRegistry.register_model`` (lazily, as "module:Class");
* the PoD attention backend with ``register_backend`` (``PODKV_TORCH``);
* the stage-2 KV-cache spec of non-anchor layers with ``KVCacheSpecRegistry`` (``kv_specs``);
* a config hook in ``MODELS_CONFIG_MAP`` that checks the plan when the engine's config is built
  (in the calling process, before any worker starts), so a bad plan fails with a PodError there.

Registration is idempotent and does nothing to models that carry no ``pod_plan``.
"""

from __future__ import annotations

import logging

from podkv.errors import PodError
from podkv.serving import VLLM_MINOR, VLLM_PIN
from podkv.serving.checks import POD_ARCHITECTURES

log = logging.getLogger(__name__)


def check_vllm_version(version: str) -> None:
    if not (version == VLLM_MINOR or version.startswith(VLLM_MINOR + ".")):
        raise PodError(f"podkv.serving is written for vLLM {VLLM_MINOR}.x but vLLM {version} is installed: "
                       f"pip install '{VLLM_PIN}' (the model/attention interfaces change between releases)")


def register() -> None:
    """Entry point (``[project.entry-points."vllm.general_plugins"] podkv = ...:register``)."""
    import vllm
    from vllm import ModelRegistry

    check_vllm_version(vllm.__version__)
    for pod_arch in POD_ARCHITECTURES.values():
        if pod_arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(pod_arch, f"podkv.serving.llama:{pod_arch}")
    _register_backend()
    _register_config_hook()
    from podkv.serving.kv_specs import register_pod_kv_specs

    register_pod_kv_specs()


def _register_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from podkv.serving.attention_names import BACKEND_NAME, BACKEND_PATH

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_PATH)


def _register_config_hook() -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    class PodServingConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            from podkv.serving.checks import kv_layout, plan_for_serving

            hf_config = vllm_config.model_config.hf_config
            plan = plan_for_serving(hf_config)
            if kv_layout(hf_config) == "shared" and vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
                raise PodError("--disable-hybrid-kv-cache-manager: PoD's shared KV layout needs vLLM's hybrid KV-cache "
                               "manager (anchor and proximal-key layers are different cache groups); "
                               "drop the flag or serve with pod_kv_layout='full' (no memory saving)")
            cache = vllm_config.cache_config
            if cache.enable_prefix_caching:
                # A non-anchor layer's sink keys live outside the shared paged blocks; reusing a
                # cached prefix is not handled yet (docs/serving.md).
                log.warning("podkv: disabling prefix caching for a PoD model (not supported yet)")
                cache.enable_prefix_caching = False
            if kv_layout(hf_config) == "shared":
                _tune_shared_layout(vllm_config, plan)
            log.info("podkv: %s", plan.summary())

    for pod_arch in POD_ARCHITECTURES.values():
        MODELS_CONFIG_MAP.setdefault(pod_arch, PodServingConfig)


# Stage 2: a proximal-key cache's block is (1 + B) anchor blocks, and vLLM reserves whole blocks per
# request, so small blocks keep its fixed cost near ns + nr (vLLM's CPU default is 128).
SHARED_LAYOUT_BLOCK_SIZE = 16


def _tune_shared_layout(vllm_config, plan) -> None:
    """Default a small KV block size for the shared layout, and warn when vLLM's scheduler settings
    make the proximal-key caches reserve much more than ``ns + nr`` tokens per request."""
    cache, sched = vllm_config.cache_config, vllm_config.scheduler_config
    _choose_kernel_layout(vllm_config, plan)
    if not cache.user_specified_block_size:
        log.info("podkv: KV block size %d for the shared PoD layout (pass --block-size to override)",
                 SHARED_LAYOUT_BLOCK_SIZE)
        cache.block_size = SHARED_LAYOUT_BLOCK_SIZE
        cache.user_specified_block_size = True
    in_flight = sched.max_num_batched_tokens or 0
    suggest = max(plan.ns + plan.nr, 256)
    if in_flight > 4 * suggest:
        # SlidingWindowSpec.max_admission_blocks_per_request: window - 1 + in-flight tokens, whole blocks.
        log.warning("podkv: max_num_batched_tokens=%d: each non-anchor layer's proximal-key cache reserves about "
                    "%d tokens per request instead of ns+nr=%d (vLLM frees out-of-window blocks one step late), "
                    "which eats into the PoD saving; use chunked prefill with --max-num-batched-tokens <= %d",
                    in_flight, in_flight + plan.nr + plan.ns, plan.ns + plan.nr, suggest)


def _choose_kernel_layout(vllm_config, plan) -> None:
    """Serve on vLLM's CPU kernel (``config.pod_kv_kernel``) where it applies: blocks of one length, mode "keys"
    (the kernel has no per-key query switch), float32 (the "vec" kernel's layout) and a block size that is a
    multiple of 32 (the kernel's; 32 if not given). Asked for explicitly where it does not apply: a PodError."""
    import torch

    from podkv.serving.checks import layer_anchors
    from podkv.serving.kernel_layout import KERNEL_BLOCK_MULTIPLE, uniform_block_length

    hf_config, cache = vllm_config.model_config.hf_config, vllm_config.cache_config
    wanted = getattr(hf_config, "pod_kv_kernel", None)
    why = None
    if wanted is False:
        why = "pod_kv_kernel=False"
    elif uniform_block_length(layer_anchors(plan)) is None:
        why = "the plan's blocks have different lengths"
    elif plan.mode == "scores":  # the kernel scores all of a query's keys with that one query
        why = "plan mode 'scores' (its distant keys are scored with the anchor's query)"
    elif vllm_config.model_config.dtype != torch.float32:
        why = f"dtype {vllm_config.model_config.dtype} (the kernel layout is float32 only)"
    elif cache.user_specified_block_size and cache.block_size % KERNEL_BLOCK_MULTIPLE:
        why = f"--block-size {cache.block_size} is not a multiple of {KERNEL_BLOCK_MULTIPLE}"
    if wanted is True and why is not None:
        raise PodError(f"config field 'pod_kv_kernel' = True: vLLM's kernel layout does not apply here: {why}; "
                       "drop pod_kv_kernel (the plugin picks the gather layout)")
    hf_config.pod_kv_kernel = why is None
    if why is None:
        if not cache.user_specified_block_size:
            cache.block_size, cache.user_specified_block_size = KERNEL_BLOCK_MULTIPLE, True
        log.info("podkv: KV layout for vLLM's CPU attention kernel (block size %d)", cache.block_size)
    elif wanted is False:
        log.info("podkv: gather path for PoD attention (%s)", why)
    else:  # a warning: the user did not ask for the slower path (docs/serving.md, Throughput)
        log.warning("podkv: PoD attention on the gather path, not vLLM's CPU kernel, because %s", why)
