"""Hand the cache of the forward in progress to PoD attention, and check it once per forward.

Why transformers needs this: Llama-style attention takes the cache as a named parameter
(``past_key_values``; ``cache`` in later 5.x releases), calls ``cache.update(...)`` and then the
registered attention function with only (module, query, key, value, mask, **kwargs): the cache
object never reaches it. PoD attention needs it — a sharing head reads distant keys from its anchor
layer's storage and its proximal keys from what the layer held *before* this step. So a forward
pre-hook on the decoder model puts the call's cache on the model's :class:`PodRuntime` for the
duration of that forward only; a post-hook (``always_call``: also on exception) takes it off. The
attention function then recognises that its layer's store was just updated by identity
(``PodLayer.update`` returns its value tensor, which attention receives as ``value``). No global
state: a stray ``cache.update`` or a forward with another cache cannot leak into the next forward.

The same hook rejects, with one line, what would otherwise go silently wrong: a cache that does
not hand attention every key (StaticCache's padded buffers, sliding windows), a PodCache built for
another plan, a PodCache left half-updated, a compacted PodCache without explicit positions, and
inputs beyond the model's positions.
"""

from __future__ import annotations

import torch

from podkv import compat
from podkv.attention.interface import padding_from_mask
from podkv.cache.pod_cache import PodCache
from podkv.errors import PodError


def install(model) -> list:
    """Register the hooks on ``model``'s decoder; returns their handles (``disable_pod`` removes them)."""
    base = model.base_model
    base.pod_runtime = model.pod_runtime  # read at call time, so a deep-copied model uses its own runtime
    return [base.register_forward_pre_hook(_enter, with_kwargs=True),
            base.register_forward_hook(_exit, with_kwargs=True, always_call=True)]


def _enter(module, args, kwargs) -> None:
    runtime = module.pod_runtime
    cache = compat.given_cache(kwargs)
    runtime.caches.append(cache)  # first: _exit pops one entry even when a check below raises
    _check_length(module.config, cache, args, kwargs)
    if cache is None:
        return
    if isinstance(cache, PodCache):
        _check_plan(cache.plan, runtime.plan)
        cache.check_ready()
        check_positions(cache, kwargs)
        _set_padding(cache, args, kwargs)
        cache.in_forward += 1
    else:
        _check_full_keys(cache)


def _exit(module, args, kwargs, output) -> None:
    runtime = module.pod_runtime
    cache = runtime.caches.pop()
    if not runtime.caches and not torch.is_grad_enabled():
        # Per-forward tensors (every layer's keys, scores-mode queries) end with an inference forward. Under
        # autograd they stay until the next forward: gradient checkpointing recomputes a shared layer in the
        # backward pass, before its anchor, and reads the anchor's keys of the forward.
        runtime.keys.clear()
        runtime.queries.clear()
    if isinstance(cache, PodCache) and cache.in_forward:
        cache.in_forward -= 1


def _set_padding(cache, args, kwargs) -> None:
    """Left padding per row, from this forward's 2D mask (a chunked prefill sees more of it chunk by chunk):
    PodLayer.update moves the proximal window with it, before attention runs."""
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask")
    if inputs is None or (cache.pad is not None and (mask is None or mask.dim() != 2)):
        return
    kv_len = cache.get_seq_length() + inputs.shape[1]
    if mask is not None and mask.dim() == 2 and mask.shape[-1] < kv_len:  # missing columns are real tokens
        mask = torch.nn.functional.pad(mask, (0, kv_len - mask.shape[-1]), value=1)
    cache.pad = padding_from_mask(mask if mask is not None and mask.dim() == 2 else None, inputs.shape[0], kv_len,
                                  inputs.device)


def _check_plan(cache_plan, model_plan) -> None:
    if cache_plan is model_plan:
        return
    for name in ("ns", "nr", "mode", "anchors"):
        have, want = getattr(cache_plan, name), getattr(model_plan, name)
        if have != want:
            shown = "differ" if name == "anchors" else f"= {have!r}, the model's {want!r}"
            raise PodError(f"PodCache plan field '{name}' {shown}: build the cache from the model, "
                           "PodCache(model.config)")


def check_positions(cache, kwargs) -> None:
    """A compacted cache is shorter than the text it has seen: its length is not the next position.

    ``generate`` derives positions from the cache length, so it is refused even when it passes
    ``position_ids`` on (models/enable.py calls this with ``position_ids`` left out).
    """
    if cache.dropped and kwargs.get("position_ids") is None:
        held = cache.get_seq_length()
        raise PodError(f"this PodCache was compacted by token selection: it holds {held} of the {held + cache.dropped} "
                       f"tokens seen, so the next position is {held + cache.dropped}, not {held}. Pass position_ids "
                       "explicitly (podkv.eval.generation decodes this way); a plain generate() cannot continue it")


def _check_full_keys(cache) -> None:
    """Any other cache feeds PoD's full-keys path, exact only if ``update`` returns every key."""
    for i, layer in enumerate(getattr(cache, "layers", [])):
        limit = compat.layer_max_length(layer)
        if getattr(layer, "is_sliding", False) or limit not in (None, -1):
            raise PodError(f"{type(cache).__name__} (layer {i}: {type(layer).__name__}) returns fixed-size or "
                           "windowed keys, which PoD attention cannot read: use the default PodCache "
                           "(or a DynamicCache, exact but without PoD's memory saving)")


def _check_length(config, cache, args, kwargs) -> None:
    """Positions beyond ``max_position_embeddings`` were never trained (nor were PoD's plan and deltas)."""
    limit = getattr(config, "max_position_embeddings", None)
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if limit is None or inputs is None:
        return
    past = cache.get_seq_length() if cache is not None else 0
    if past + inputs.shape[1] > limit:
        raise PodError(f"input of {inputs.shape[1]} tokens after {past} cached ones exceeds the model's "
                       f"max_position_embeddings={limit}: shorten the prompt or max_new_tokens")
