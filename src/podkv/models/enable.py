"""`enable_pod` / `disable_pod`: switch a loaded transformers model to PoD attention and back.

Everything goes through public extension points: the attention registry, ``set_attn_implementation``
and the model's config (the plan travels in ``config.pod_plan`` so ``save_pretrained`` keeps it).
Nothing happens at import time; ``disable_pod`` undoes every change.
"""

from __future__ import annotations

import types

from podkv import compat
from podkv.attention.chunked import DEFAULT_CHUNK
from podkv.attention.interface import ATTN_NAME, PodRuntime, register
from podkv.errors import PodError
from podkv.models import chunked_forward, forward_scope
from podkv.plan import SharingPlan

# Architectures whose attention calls the AttentionInterface with post-RoPE keys right after
# cache.update (checked by tests/test_core_model.py and tests/test_block_pass.py). Others may work but are not claimed.
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


def decoder_layers(model) -> list:
    """The decoder layers in order (also through peft / DDP wrappers): modules with a ``self_attn``."""
    layers = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m.self_attn, "layer_idx")]
    return sorted(layers, key=lambda m: m.self_attn.layer_idx)


def enable_pod(model, plan: SharingPlan, *, chunk: int = DEFAULT_CHUNK, reference: bool = False,
               kv_bits: int | None = None, key_quant: str = "token", kv_keep_proximal: bool = False):
    """Make ``model`` use PoD attention with ``plan``; ``generate`` then defaults to a :class:`PodCache`.

    Parameters
    ----------
    chunk : int
        Queries scored per SDPA call during prefill (bounds memory at chunk x T per head).
    reference : bool
        Use the materialised reference attention instead (tests only; O(T^2) memory, no cache).
    kv_bits : None, 8, 4 or 2
        The default PodCache's storage: 8, 4 or 2 holds the token-long values and anchor keys in that many bits
        (:mod:`podkv.cache.quant`, groups of 64 channels or the head dim if smaller).
    key_quant : "token" or "channel"
        With ``kv_bits``: anchor keys grouped per token as the values, or per channel over 64 tokens (KIVI).
    kv_keep_proximal : bool
        With ``kv_bits``: the first ``ns`` and last ``nr`` tokens stay in the model's dtype (KIVI's residual).
    """
    check_supported(model.config)
    plan.validate_for(model.config)
    register()
    if not hasattr(model, "_pod_saved"):
        model._pod_saved = {"attn": model.config._attn_implementation}
    runtime = PodRuntime(plan=plan, chunk=chunk, kv_bits=kv_bits, key_quant=key_quant, kv_keep_proximal=kv_keep_proximal)
    from podkv.cache.pod_cache import pod_cache_for  # startup: transformers

    pod_cache_for(model.config, plan, kv_bits, key_quant, kv_keep_proximal)  # a bad setting fails here, before compute
    for module in attention_modules(model):
        module.pod_runtime = runtime
    model.config.pod_plan = plan.to_dict()
    model.set_attn_implementation("pod_reference" if reference else ATTN_NAME)
    model.pod_runtime = runtime
    for handle in model._pod_saved.pop("hooks", []):
        handle.remove()
    model._pod_saved["hooks"] = forward_scope.install(model)
    chunked_forward.install(model)
    # A bound method, not a closure: copy.deepcopy(model) rebinds it to the copy.
    model.generate = types.MethodType(_generate_with_pod_cache, model)
    return model


def disable_pod(model):
    """Undo :func:`enable_pod`: the model is a stock transformers model again."""
    saved = getattr(model, "_pod_saved", None)
    if saved is None:
        return model
    for module in attention_modules(model):
        vars(module).pop("pod_runtime", None)
    for handle in saved.get("hooks", []):
        handle.remove()
    vars(model.base_model).pop("pod_runtime", None)
    vars(model).pop("generate", None)
    chunked_forward.uninstall(model)
    vars(model).pop("pod_runtime", None)
    if hasattr(model.config, "pod_plan"):
        del model.config.pod_plan
    model.set_attn_implementation(saved["attn"])
    del model._pod_saved
    return model


def _generate_with_pod_cache(model, *args, **kwargs):
    """``generate`` with a :class:`PodCache` unless the call asks for another cache (or none).

    Assisted and prompt-lookup decoding crop the cache after each round of candidates; the cache
    then keeps enough recent keys for that crop to be exact (pod_cache.py: ``crop_margin``).
    """
    from podkv.cache.pod_cache import PodCache, pod_cache_for

    _refuse_unsupported_modes(model, kwargs)
    if model.config._attn_implementation == ATTN_NAME and _setting(model, kwargs, "use_cache") is not False:
        margin = _crop_margin(model, args, kwargs)
        cache = compat.given_cache(kwargs)
        if cache is None and _setting(model, kwargs, "cache_implementation") is None:
            runtime = model.pod_runtime
            kwargs.update(compat.cache_kwargs(pod_cache_for(model.config, runtime.plan, runtime.kv_bits,
                                                            runtime.key_quant, runtime.kv_keep_proximal,
                                                            crop_margin=margin)))
        elif isinstance(cache, PodCache):
            forward_scope.check_positions(cache, {})
            cache.reserve_crop_margin(margin)
    return type(model).generate(model, *args, **kwargs)


def _refuse_unsupported_modes(model, kwargs) -> None:
    """Generation modes PoD cannot run fail before the first token, naming the mode.

    Self-speculative early exit runs the model's first N layers as its own assistant by setting
    ``config.num_hidden_layers = N``; the plan covers every layer, so the assistant's forward would
    stop with a misleading plan-size error and leave the config truncated.
    """
    early_exit = _setting(model, kwargs, "assistant_early_exit")
    if early_exit is not None:
        raise PodError(f"generate(assistant_early_exit={early_exit}) is not supported on a PoD model: the early-exit "
                       f"assistant runs only the first {early_exit} of the plan's {model.config.num_hidden_layers} "
                       "layers on the same cache. Use assistant_model=<a smaller model> or prompt_lookup_num_tokens")


def _setting(model, kwargs, name):
    """A generation setting as generate will see it: the call, its generation_config, the model's."""
    if name in kwargs:
        return kwargs[name]
    config = kwargs.get("generation_config") or model.generation_config
    return getattr(config, name, None)


def _crop_margin(model, args, kwargs) -> int:
    """Extra recent keys so that one round of candidate decoding can be rolled back exactly.

    A round verifies at most ``per_round`` candidates and crops the rejected ones; PodCache crops
    ``crop_margin + 1`` tokens exactly. transformers caps a round at the tokens left to generate.
    """
    lookup = _setting(model, kwargs, "prompt_lookup_num_tokens")
    assistant = kwargs.get("assistant_model")
    if lookup is None and assistant is None and _setting(model, kwargs, "assistant_early_exit") is None:
        return 0
    prompt = kwargs.get("input_ids", args[0] if args else None)
    left = _setting(model, kwargs, "max_new_tokens")
    if left is None:
        left = (_setting(model, kwargs, "max_length") or 20) - (0 if prompt is None else prompt.shape[-1])
    per_round = left
    if lookup is not None:
        per_round = min(left, lookup)
    elif assistant is not None and getattr(assistant.generation_config, "num_assistant_tokens_schedule",
                                           "constant") in (None, "constant"):
        per_round = min(left, int(assistant.generation_config.num_assistant_tokens or 20))
    return max(0, per_round - 1)
