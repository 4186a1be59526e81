"""A PoD model's ``forward``: a ``PodCache`` by default, and long inputs fed in chunks of at most ``nr``.

Why chunks: in ``scores`` mode a block's distant pass is computed once, by its anchor layer, for every
layer of the block (:mod:`podkv.attention.block_pass`). That needs the values of the block's later
layers for every distant token of the step, which holds when a step adds at most ``nr`` tokens. So a
long input that continues a cache, a padded batch, or a prompt longer than ``ONE_SHOT_MAX`` goes through the
model ``nr`` tokens at a time — exact (chunked prefill equals one-shot, tested). A first, unpadded prompt of up
to ``ONE_SHOT_MAX`` tokens goes in one forward instead: each layer's two-pass prefill
(:mod:`podkv.attention.prefill`, the anchors' queries for distant keys) measured faster than ``nr``-token
steps at 1K on CPU, slower from 2K on (the numbers at ``ONE_SHOT_MAX``). Where the compiled prefill kernel runs
(batch 1, float32 on CPU) one forward is faster up to ``ONE_SHOT_MAX_COMPILED``. ``runtime.prefill_chunk`` set forces
steps of that size.
``generate`` calls this ``forward`` too.

Why a default cache: transformers builds a ``DynamicCache`` when ``use_cache`` is on and no cache is
given; it holds every key of every layer, so a PoD model would save nothing, silently. Inference
forwards get a ``PodCache`` instead (training forwards keep transformers' behaviour).

Falls back to one forward when the call asks for something chunks cannot give (labels, per-layer
outputs, a 4D mask, a tensor ``logits_to_keep``) or the plan is in ``keys`` mode.
"""

from __future__ import annotations

import types

import torch

from podkv import compat
from podkv.attention.interface import ATTN_NAME
from podkv.cache.pod_cache import PodCache, pod_cache_for


# Longest first prompt prefilled in one forward on the PyTorch two-pass path. Same runs, smollm2-pod, PoD ÷ dense,
# one forward / 240-token steps, after the block pass took base-2 exponentials
# (benchmarks/shipped/prefill_exp2_*.json): 2 threads 2K 1.31 / 1.21, 4K 1.21 / 0.97; 1 thread 1K 1.07 / 1.11,
# 2K 1.10 / 1.07, 4K 1.17 / 1.00, 8K 1.17 / 0.96. From 2K on the steps' shared softmax outweighs their overhead.
ONE_SHOT_MAX = 1024
# ... on the compiled kernel (attention/native/pod_prefill.c), which scores each key once and keeps no score matrix,
# but gives up the block's shared distant scores that steps of nr keep. PoD ÷ dense, same runs
# (benchmarks/shipped/prefill_compiled_*.json), one forward compiled / two-pass / steps: one thread 1K 0.97 / 1.11 / -,
# 4K 1.00 / 1.18 / 1.23, 8K 1.11 / - / 1.01; two threads 8K 0.90 / - / 1.17 (the kernel's 64-row tasks use both
# cores, the steps' small products do not). So one forward up to the longest prompt: at one thread, from 8K on,
# steps would be faster.
ONE_SHOT_MAX_COMPILED = 8192


def one_forward(runtime, n: int, past: int = 0, padded: bool = False, compiled: bool = False) -> bool:
    """Whether ``n`` new tokens go through a ``scores``-mode model in one forward rather than in steps: at most one
    step's worth, or a first, unpadded prompt of at most ``ONE_SHOT_MAX`` tokens (``ONE_SHOT_MAX_COMPILED`` when
    ``compiled``: the prefill runs on the compiled kernel) unless ``runtime.prefill_chunk`` asks for steps. (Shared
    with the speed benchmark, which reports how it fed each prompt.)"""
    if n <= (runtime.prefill_chunk or runtime.plan.nr):
        return True
    longest = ONE_SHOT_MAX_COMPILED if compiled else ONE_SHOT_MAX
    return runtime.prefill_chunk is None and past == 0 and n <= longest and not padded


def compiled_prefill(model, batch: int, device) -> bool:
    """Whether a one-shot prefill of ``batch`` prompts on ``device`` runs on the compiled kernel
    (:func:`podkv.attention.prefill.compiled_applies` for the model's attention shape)."""
    from podkv.attention.prefill import compiled_applies
    from podkv.cache.memory import head_dim, kv_heads

    config = getattr(model, "config", None)
    if config is None:
        return False
    return compiled_applies(batch, config.num_attention_heads, kv_heads(config), head_dim(config), model.dtype, device)


def install(model) -> None:
    """Bind the chunking ``forward`` on ``model`` (a bound method: ``copy.deepcopy`` rebinds it)."""
    model.forward = types.MethodType(_pod_forward, model)


def uninstall(model) -> None:
    vars(model).pop("forward", None)


def _pod_forward(model, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                 logits_to_keep=0, **kwargs):
    base = type(model).forward
    call = dict(attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=logits_to_keep, **kwargs)
    inference = not (torch.is_grad_enabled() and model.training) and model.config._attn_implementation == ATTN_NAME
    cache = compat.given_cache(kwargs)
    if cache is None and inference and kwargs.get("use_cache", model.config.use_cache):
        runtime = model.pod_runtime
        cache = pod_cache_for(model.config, runtime.plan, runtime.kv_bits, runtime.key_quant, runtime.kv_keep_proximal)
        for name in compat.CACHE_ARGS:
            call.pop(name, None)
        call[compat.CACHE_ARG] = cache
    tokens = input_ids if input_ids is not None else inputs_embeds
    runtime = model.pod_runtime
    step = runtime.prefill_chunk or runtime.plan.nr
    if not (_chunkable(model, cache, call, inference) and tokens is not None and tokens.shape[1] > step):
        return base(model, input_ids=input_ids, inputs_embeds=inputs_embeds, **call)  # decode: no mask check
    n, past = tokens.shape[1], cache.get_seq_length()
    padded = attention_mask is not None and not bool(attention_mask.all())
    if one_forward(runtime, n, past, padded, compiled_prefill(model, tokens.shape[0], tokens.device)):  # one-shot
        return base(model, input_ids=input_ids, inputs_embeds=inputs_embeds, **call)

    logits, out = [], None
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        part = dict(call)
        if attention_mask is not None:
            part["attention_mask"] = attention_mask[:, :past + c1]
        for name in ("position_ids", "cache_position"):
            if call.get(name) is not None:
                part[name] = call[name][..., c0:c1]
        out = base(model, input_ids=None if input_ids is None else input_ids[:, c0:c1],
                   inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, c0:c1], **part)
        logits.append(out.logits)
    out.logits = torch.cat(logits, dim=1)
    if logits_to_keep:
        out.logits = out.logits[:, -logits_to_keep:]
    return out


def _chunkable(model, cache, call, inference) -> bool:
    mask = call.get("attention_mask")
    return (inference and isinstance(cache, PodCache) and model.pod_runtime.plan.mode == "scores"
            and model.pod_runtime.decode_fast_path and call.get("labels") is None
            and not call.get("output_attentions") and not call.get("output_hidden_states")
            and isinstance(call.get("logits_to_keep", 0), int) and (mask is None or mask.dim() == 2))
