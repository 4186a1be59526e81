"""`enable_pod` / `disable_pod`: switch a loaded transformers model to PoD attention and back.

Everything goes through public extension points: the attention registry, ``set_attn_implementation``
and the model's config (the plan travels in ``config.pod_plan`` so ``save_pretrained`` keeps it).
Nothing happens at import time; ``disable_pod`` undoes every change.
"""

from __future__ import annotations

import functools

from podkv.attention.chunked import DEFAULT_CHUNK
from podkv.attention.interface import ATTN_NAME, PodRuntime, register
from podkv.errors import PodError
from podkv.plan import SharingPlan

# Architectures whose attention calls the AttentionInterface with post-RoPE keys right after
# cache.update (checked by tests/test_models.py). Others may work but are not claimed.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise PodError(f"unsupported architecture model_type={config.model_type!r}: podkv supports "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        raise PodError(f"config.sliding_window={window}: PoD needs full attention (the window is PoD's own nr)")


def attention_modules(model):
    """The decoder's self-attention modules, in layer order."""
    mods = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    return sorted(mods, key=lambda m: m.layer_idx)


def enable_pod(model, plan: SharingPlan, *, chunk: int = DEFAULT_CHUNK, reference: bool = False):
    """Make ``model`` use PoD attention with ``plan``; ``generate`` then defaults to a :class:`PodCache`.

    Parameters
    ----------
    chunk : int
        Queries scored per SDPA call during prefill (bounds memory at chunk x T per head).
    reference : bool
        Use the materialised reference attention instead (tests only; O(T^2) memory, no cache).
    """
    check_supported(model.config)
    plan.validate_for(model.config)
    register()
    if not hasattr(model, "_pod_saved"):
        model._pod_saved = {"attn": model.config._attn_implementation}
    runtime = PodRuntime(plan=plan, chunk=chunk)
    for module in attention_modules(model):
        module.pod_runtime = runtime
    model.config.pod_plan = plan.to_dict()
    model.set_attn_implementation("pod_reference" if reference else ATTN_NAME)
    model.pod_runtime = runtime
    if "generate" not in vars(model):
        model.generate = _generate_with_pod_cache(model, type(model).generate.__get__(model))
    return model


def disable_pod(model):
    """Undo :func:`enable_pod`: the model is a stock transformers model again."""
    saved = getattr(model, "_pod_saved", None)
    if saved is None:
        return model
    for module in attention_modules(model):
        vars(module).pop("pod_runtime", None)
    vars(model).pop("generate", None)
    vars(model).pop("pod_runtime", None)
    if hasattr(model.config, "pod_plan"):
        del model.config.pod_plan
    model.set_attn_implementation(saved["attn"])
    del model._pod_saved
    return model


def _generate_with_pod_cache(model, generate):
    @functools.wraps(generate)
    def wrapper(*args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True) \
                and model.config._attn_implementation == ATTN_NAME:
            from podkv.cache.pod_cache import PodCache

            kwargs["past_key_values"] = PodCache(model.config, model.pod_runtime.plan)
        return generate(*args, **kwargs)

    return wrapper
