"""The ``"pod"`` attention function for transformers' ``AttentionInterface`` registry.

Two sources of keys, one math (:mod:`podkv.attention.chunked`):
  * the forward in progress uses a :class:`~podkv.cache.PodCache` (the model's forward hook put it on
    ``PodRuntime.caches``, see :mod:`podkv.models.forward_scope`), which just updated this layer:
    held proximal keys + the new tokens' own keys + distant keys read from the anchor layers' storage;
  * anything else (no cache, training, or a cache that returns full keys such as DynamicCache):
    the key tensor covers every position, and anchor keys come from this forward's earlier layers,
    kept in the model's :class:`PodRuntime`. Exact, but no memory is saved.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from podkv.attention.chunked import DEFAULT_CHUNK, KeySources, pod_attention_groups
from podkv.attention import gate_skip
from podkv.attention import block_pass
from podkv.attention.block_pass import block_pass_applies, pod_block_attention
from podkv.attention.decode import decode_applies, pod_decode
from podkv.attention.heads import select_heads
from podkv.attention.reference import pod_attention_reference
from podkv.cache.pod_cache import PodCache
from podkv.errors import PodError
from podkv.plan import SharingPlan

ATTN_NAME = "pod"
REFERENCE_ATTN_NAME = "pod_reference"


@dataclass
class PodRuntime:
    """Per-model state shared by all attention modules (attached by :func:`podkv.enable_pod`)."""

    plan: SharingPlan
    chunk: int = DEFAULT_CHUNK
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> full keys of this forward
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> queries ("scores" mode)
    skip_tau: float | None = None  # gate skipping in decode (paper §2.3); None = off. See gate_skip.py
    skip: gate_skip.GateSkipState = field(default_factory=gate_skip.GateSkipState)  # its counters
    observe_window: int | None = None  # record each layer's last N queries (token selection, cache/selection.py)
    observed: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, Hq, N, D)
    observed_scale: float = 1.0
    decode_fast_path: bool = True  # one-token steps read keys in place (decode.py); False: the chunked path
    warned_slow: bool = False  # a scores-mode step took the general path (warned once)
    prefill_chunk: int | None = None  # tokens per forward step of a long input ("scores" mode); None: one step for
    # a first unpadded prompt up to ONE_SHOT_MAX tokens, steps of plan.nr otherwise (models/chunked_forward.py)
    caches: list = field(default_factory=list)  # cache of each forward in progress, innermost last (forward_scope.py)
    kv_bits: int | None = None  # storage of the PodCache a forward or generate makes by default (8, 4: cache/quant.py)
    key_quant: str = "token"  # its anchor keys' grouping with kv_bits: "token" or "channel" (KIVI)
    kv_keep_proximal: bool = False  # with kv_bits: the first ns and last nr tokens in the model's dtype


def pod_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention signature: query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D) -> ((B, Tq, Hq, D), None)."""
    return _forward(module, query, key, value, attention_mask, scaling, dropout, reference=False)


def pod_reference_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Same contract, computed by the materialised oracle (tests and debugging; O(T^2) memory)."""
    return _forward(module, query, key, value, attention_mask, scaling, dropout, reference=True)


def _forward(module, query, key, value, attention_mask, scaling, dropout, reference):
    runtime: PodRuntime | None = getattr(module, "pod_runtime", None)
    if runtime is None:
        raise PodError("this model uses attn_implementation='pod' but has no plan: call podkv.enable_pod(model, plan)")
    plan, layer = runtime.plan, module.layer_idx
    scale = module.scaling if scaling is None else scaling
    dropout = dropout if module.training else 0.0
    if runtime.observe_window:
        runtime.observed[layer], runtime.observed_scale = query[:, :, -runtime.observe_window:].detach(), scale
    cache = runtime.caches[-1] if runtime.caches else None
    step = None
    if isinstance(cache, PodCache):
        step = getattr(value, "pod_step", None)  # PodLayer.update hands everything attention reads with the values
        if step is None or step.store is not cache.layers[layer] or step.i1 != step.store.seen:
            raise PodError(f"PoD attention of layer {layer} got values its PodCache did not just return: the cache "
                           "must be updated by this layer's forward right before attention")
        # A first, unpadded step is a one-shot prefill: the compiled kernel or the two-pass path (prefill.py)
        # beat steps of nr through the block pass on CPU (docs/bench.md); longer than nr, the block pass would
        # keep L x (L - nr) exp-scores.
        one_shot = step.i0 == 0 and not bool(cache.pad.any())
        if not reference and not (one_shot and query.shape[2] > plan.nr) \
                and block_pass_applies(cache, query, runtime.decode_fast_path):
            out = pod_block_attention(step, query, key, scale)  # "scores" mode: no anchor query kept
            return out.transpose(1, 2).contiguous(), None
        if (plan.mode == "scores" and not reference and not torch.is_grad_enabled() and not one_shot
                and not runtime.warned_slow):
            runtime.warned_slow = True
            warnings.warn(f"podkv: a {query.shape[2]}-token step of a scores-mode plan takes the general path "
                          f"(every layer recomputes its anchor's scores): the one-pass-per-block path needs steps of "
                          f"at most {max(plan.nr, block_pass.STEP_LIMIT)} tokens and decode_fast_path on", stacklevel=2)
    if plan.mode == "scores":
        runtime.queries[layer] = query
    anchor_query = _anchor_query(runtime, layer, query) if plan.mode == "scores" else None

    if step is not None:
        if gate_skip.applies(runtime, step, query, anchor_query) and not reference:
            out = gate_skip.decode_attention(step, query, key, scale, runtime)
        elif runtime.decode_fast_path and decode_applies(step, query, anchor_query) and not reference:
            out = pod_decode(step, query, key, scale)
        else:
            out = _from_pod_cache(step, query, key, plan, scale, anchor_query, runtime, dropout, reference)
    else:
        out = _from_full_keys(runtime, layer, query, key, value, attention_mask, plan, scale, anchor_query, dropout, reference)
    _drop_spent(runtime, layer, module.training)
    return out.transpose(1, 2).contiguous(), None


def _drop_spent(runtime: PodRuntime, layer: int, training: bool) -> None:
    """After ``layer``'s attention in an inference forward (eval mode, no autograd), forget the queries and keys that
    no later layer reads (those of layers that anchor nothing past it). Why: each is a (B, H, T, D) tensor, and
    keeping all 30 held 72 MB of queries at 1K, 570 MB at 8K, until the forward ended.
    A model in train mode keeps them: reentrant checkpointing runs its first forward without autograd and then
    recomputes a shared layer after its anchor (forward_scope.py), as autograd does."""
    if training or torch.is_grad_enabled() or not (runtime.queries or runtime.keys):
        return
    last = {a: l for l, row in enumerate(runtime.plan.anchors) for a in row}  # anchor -> last layer reading it
    for held in (runtime.queries, runtime.keys):
        for a in [a for a in held if last.get(a, -1) <= layer]:
            del held[a]


def _from_full_keys(runtime, layer, query, key, value, mask, plan, scale, anchor_query, dropout, reference):
    T = key.shape[2]
    runtime.keys[layer] = key  # read by later layers of this same forward
    pad = padding_from_mask(mask, key.shape[0], T, key.device)
    sources = [(key, h) if a == layer else (_runtime_keys(runtime, a, T), h) for h, a in enumerate(plan.anchors[layer])]
    window = plan.window_heads(layer)
    if reference:
        anchor = torch.stack([t[:, i] for t, i in sources], dim=1)
        return pod_attention_reference(query, key, anchor, value, ns=plan.ns, nr=plan.nr, scale=scale, pad=pad,
                                       anchor_query=anchor_query, window_heads=window)
    if not window:
        heads = list(range(key.shape[1]))
        groups = [(heads, KeySources(own_keys=key, own_start=0, values=value, anchor_keys=sources,
                                     own_anchor_heads=_own_anchors(plan, layer, heads)))]
    else:
        rest = [h for h in range(key.shape[1]) if h not in window]
        groups = [(heads, KeySources(own_keys=key[:, heads], own_start=0, values=value[:, heads],
                                     anchor_keys=[sources[h] for h in heads], proximal_only=heads is window,
                                     own_anchor_heads=() if heads is window else _own_anchors(plan, layer, heads)))
                  for heads in (rest, window) if heads]
    return pod_attention_groups(query, T - query.shape[2], groups, pad=pad, ns=plan.ns, nr=plan.nr, scale=scale,
                                anchor_query=anchor_query, chunk=runtime.chunk, dropout=dropout)


def _from_pod_cache(step, query, key, plan, scale, anchor_query, runtime, dropout, reference):
    cache, store, layer = step.cache, step.store, step.layer
    if reference:
        raise PodError("the reference attention runs without a PodCache (it is the oracle for full sequences)")
    held_k, held_v, held_idx = step.held()
    rest = store.value_heads  # heads with values of every token in store.v (all but window-only ones)
    sources = [store.anchor_source(h) if a == layer else cache.layers[a].anchor_source(h)
               for h, a in enumerate(plan.anchors[layer]) if h in store.vrow]
    groups = []
    if rest:
        groups.append((rest, KeySources(own_keys=select_heads(key, rest), own_start=step.i0, values=store.v,
                                        anchor_keys=sources, held_keys=select_heads(held_k, rest),
                                        held_values=select_heads(held_v, rest), held_idx=held_idx,
                                        own_anchor_heads=_own_anchors(plan, layer, rest))))
    if store.window_heads:
        win = store.window_heads
        groups.append((win, KeySources(own_keys=key[:, win], own_start=step.i0, values=step.values_new[:, win],
                                       values_start=step.i0, anchor_keys=[], held_keys=held_k[:, win],
                                       held_values=held_v[:, win], held_idx=held_idx, proximal_only=True)))
    return pod_attention_groups(query, step.i0, groups, pad=cache.pad, ns=plan.ns, nr=plan.nr, scale=scale,
                                anchor_query=anchor_query, chunk=runtime.chunk, dropout=dropout)


def _own_anchors(plan, layer: int, heads) -> tuple[int, ...]:
    """Positions in ``heads`` of the KV heads that are their own anchor in ``layer``."""
    return tuple(i for i, h in enumerate(heads) if plan.anchors[layer][h] == layer)


def _runtime_keys(runtime: PodRuntime, anchor: int, T: int) -> torch.Tensor:
    keys = runtime.keys.get(anchor)
    if keys is None or keys.shape[2] != T:
        raise PodError(f"PoD attention has no keys of anchor layer {anchor} for this forward pass; a cache that drops "
                       "layers or tokens cannot feed PoD: use PodCache")
    return keys


def _anchor_query(runtime: PodRuntime, layer: int, query: torch.Tensor) -> torch.Tensor:
    """Queries of each head's anchor layer, laid out like ``query`` (B, Hq, Tq, D)."""
    anchors = runtime.plan.anchors[layer]
    group = query.shape[1] // len(anchors)
    parts = [runtime.queries[a][:, h * group:(h + 1) * group] for h, a in enumerate(anchors)]
    return torch.cat(parts, dim=1)


def padding_from_mask(mask, batch: int, kv_len: int, device) -> torch.Tensor:
    """Left-padding count per row from the 2D padding mask our mask function passes through."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if mask.dim() != 2:
        raise PodError(f"PoD attention expects a 2D padding mask, got shape {tuple(mask.shape)}")
    mask = mask[:, -kv_len:].bool()
    pad = (mask.long().cumsum(-1) == 0).sum(-1)
    if bool((mask.sum(-1) != kv_len - pad).any()):
        raise PodError("PoD attention supports left padding only (padding found after the first real token): "
                       "set tokenizer.padding_side = 'left'")
    return pad


def pod_padding_mask(*, kv_length, kv_offset=0, attention_mask=None, **kwargs):
    """Mask function for the ``"pod"`` implementation: pass the 2D padding mask (B, kv_length) through.

    PoD builds its own per-chunk masks from cache indices, so a (B, 1, T, T) mask is never needed.
    Arguments by keyword: transformers 5.2 also passes ``cache_position``, later releases ``q_length``.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    mask = attention_mask.bool()
    if mask.shape[-1] < kv_length:  # transformers' convention: missing columns are real tokens
        mask = torch.nn.functional.pad(mask, (0, kv_length - mask.shape[-1]), value=True)
    mask = mask[:, kv_offset:kv_offset + kv_length]
    return None if bool(mask.all()) else mask


def register() -> None:
    """Register ``"pod"`` and ``"pod_reference"`` with transformers (idempotent, called by enable_pod)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, pod_attention_forward)
    AttentionInterface.register(REFERENCE_ATTN_NAME, pod_reference_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, pod_padding_mask)
    AttentionMaskInterface.register(REFERENCE_ATTN_NAME, pod_padding_mask)
