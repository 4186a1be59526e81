"""`PodCache`: a transformers `Cache` that holds distant keys once per block (paper §2.3).

Per layer it holds
  * values of every token, for every KV head;
  * keys of every token for the heads that are their own anchor (``k_full``, B x Ha x T x D);
  * for the other heads only proximal keys (``k_prox``, B x Hn x min(T, ns+nr) x D): ``ns`` sink
    slots and a rolling window of the last ``nr`` tokens, at cache indices ``prox_idx`` (B x n).
Distant keys of a sharing head are read from its anchor layer's ``k_full`` at attention time.

The model calls ``update`` right before attention; ``update`` appends what is kept in full and
hands the layer to PoD attention, which reads the held proximal keys *before* the new tokens
replace them, then calls ``commit`` to roll the window.
"""

from __future__ import annotations

import contextvars

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from podkv.plan import SharingPlan

# Set by PodCache.update and consumed by the very next PoD attention call of the same layer.
ACTIVE_LAYER: contextvars.ContextVar = contextvars.ContextVar("podkv_active_layer", default=None)


class PodLayer(CacheLayerMixin):
    """One layer's PoD storage. Shapes in the module docstring."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: PodCache, layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        plan = cache.plan
        self.anchor_heads = plan.anchor_heads(layer_idx)
        self.shared_heads = plan.shared_heads(layer_idx)
        self.v: torch.Tensor | None = None
        self.k_full: torch.Tensor | None = None
        self.k_prox: torch.Tensor | None = None
        self.prox_idx: torch.Tensor | None = None  # (B, n) cache index of each k_prox slot, -1 = empty
        self.seen = 0
        self._pending: torch.Tensor | None = None  # new keys of shared heads, until commit

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        B, _, _, D = key_states.shape
        self.v = value_states.new_zeros(B, value_states.shape[1], 0, value_states.shape[-1])
        if self.anchor_heads:
            self.k_full = key_states.new_zeros(B, len(self.anchor_heads), 0, D)
        if self.shared_heads:
            self.k_prox = key_states.new_zeros(B, len(self.shared_heads), 0, D)
        self.prox_idx = torch.zeros(B, 0, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, cache_kwargs=None):
        """key/value_states (B, H, C, D) -> (new keys, all values); see the module docstring."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.v = torch.cat([self.v, value_states], dim=2)
        if self.anchor_heads:
            self.k_full = torch.cat([self.k_full, _heads(key_states, self.anchor_heads)], dim=2)
        self._pending = _heads(key_states, self.shared_heads) if self.shared_heads else None
        self.seen_before, self.seen = self.seen, self.seen + key_states.shape[2]
        self.cache.step = (self.seen_before, self.seen)
        ACTIVE_LAYER.set((self.cache, self.layer_idx))
        return key_states, self.v

    # ---------------------------------------------------------- attention side
    def held(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Proximal keys and values held before this step, for every KV head: (B, H, n, D) x2, idx (B, n)."""
        idx = self.prox_idx
        B, n = idx.shape
        H, D = self.v.shape[1], self.v.shape[-1]
        gather = idx.clamp(min=0)[:, None, :, None]
        values = torch.gather(self.v, 2, gather.expand(B, H, n, D))
        if not self.anchor_heads:
            return self.k_prox, values, idx
        keys = self.v.new_empty(B, H, n, D)
        keys[:, self.anchor_heads] = torch.gather(self.k_full, 2, gather.expand(B, len(self.anchor_heads), n, D))
        if self.shared_heads:
            keys[:, self.shared_heads] = self.k_prox
        return keys, values, idx

    def held_shared(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`held` for the shared heads only (their order), without gathering anchor keys."""
        idx = self.prox_idx
        B, n = idx.shape
        gather = idx.clamp(min=0)[:, None, :, None].expand(B, 1, n, self.v.shape[-1])
        values = torch.cat([torch.gather(self.v[:, h:h + 1], 2, gather) for h in self.shared_heads], dim=1)
        return self.k_prox, values, idx

    def anchor_source(self, head: int) -> tuple[torch.Tensor, int]:
        """(k_full tensor, index in it) of this layer for a head it anchors."""
        return self.k_full, self.anchor_heads.index(head)

    def commit(self) -> None:
        """Roll the proximal store forward over the tokens added by the last update."""
        new_idx, pos = self.cache.transition(self.seen_before, self.seen)
        if self.shared_heads:
            cand = torch.cat([self.k_prox, self._pending], dim=2)
            B, H, _, D = cand.shape
            self.k_prox = torch.gather(cand, 2, pos[:, None, :, None].expand(B, H, pos.shape[1], D))
        self.prox_idx = new_idx
        self._pending = None

    # ------------------------------------------------------------ bookkeeping
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.seen + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.v, self.k_full, self.k_prox) if t is not None]

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("PodCache does not support beam search yet")


class PodCache(Cache):
    """KV cache for a PoD model: ``model.generate(..., past_key_values=PodCache(model.config, plan))``.

    Parameters
    ----------
    config : PretrainedConfig
        The model's config; the plan is validated against it.
    plan : SharingPlan, optional
        Defaults to ``config.pod_plan`` (set by :func:`podkv.enable_pod`).
    """

    def __init__(self, config, plan: SharingPlan | None = None):
        from podkv.plan import plan_from_config

        plan = plan or plan_from_config(config)
        if plan is None:
            raise ValueError("PodCache needs a plan: pass one, or call podkv.enable_pod(model, plan) first")
        plan.validate_for(config)
        self.plan = plan
        self.pad = None  # (B,) left-padding counts, fixed at prefill (see the property)
        self._transitions: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.step: tuple[int, int] | None = None  # (tokens before, after) of the forward in progress
        self._per_step: tuple[tuple[int, int] | None, dict] = (None, {})
        super().__init__(layers=[PodLayer(self, i) for i in range(plan.num_layers)])

    def transition(self, before: int, after: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New proximal slot indices (B, n) and, for each, its position among [old slots | new tokens].

        The same for every layer, so it is computed once per step.
        """
        key = (before, after)
        if key not in self._transitions:
            self._transitions = {key: _proximal_transition(self.layers[0].prox_idx if before else None,
                                                           before, after, self.pad, self.plan.ns, self.plan.nr)}
        return self._transitions[key]

    @property
    def pad(self) -> torch.Tensor | None:
        return self._pad

    @pad.setter
    def pad(self, pad: torch.Tensor | None) -> None:
        """Also keep, as Python values, what every layer of every decode step asks of it."""
        self._pad = pad
        self.pad_min = None if pad is None else int(pad.min())
        self.pad_uniform = None if pad is None else bool((pad == pad[0]).all())

    def reset_step_state(self) -> None:
        """Forget per-step memos (after the cache was edited in place, e.g. compacted)."""
        self._transitions, self.step, self._per_step = {}, None, (None, {})

    def per_step(self, name: str, build):
        """``build()`` once per forward step, shared by all layers (masks and indices depend only on
        the step, not the layer)."""
        if self._per_step[0] != self.step:
            self._per_step = (self.step, {})
        memo = self._per_step[1]
        if name not in memo:
            memo[name] = build()
        return memo[name]

    def kv_bytes(self) -> int:
        """Bytes held by key and value tensors right now (index bookkeeping excluded)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def index_bytes(self) -> int:
        """Bytes of the (B, ns+nr) slot-index tensors: bookkeeping, shared by all layers."""
        idx = self.layers[0].prox_idx
        return 0 if idx is None else idx.numel() * idx.element_size()


def _heads(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    if heads == list(range(x.shape[1])):
        return x
    return x[:, heads]


def _proximal_transition(old_idx, before, after, pad, ns, nr):
    """Which cache indices the proximal store keeps after ``after`` tokens, and where to find them."""
    B = pad.shape[0]
    device = pad.device
    new_tokens = torch.arange(before, after, device=device).expand(B, -1)
    cand = new_tokens if old_idx is None else torch.cat([old_idx, new_tokens], dim=1)
    if after <= ns + nr:  # still short: keep every token, in order
        return torch.arange(after, device=device).expand(B, -1), torch.arange(after, device=device).expand(B, -1)
    sinks = pad[:, None] + torch.arange(ns, device=device)[None]
    sinks = torch.where(sinks < after, sinks, -1)
    recent = torch.arange(after - nr, after, device=device)
    ring = torch.empty_like(recent)
    ring[recent % nr] = recent  # slot j % nr, like a ring buffer: a step moves one slot
    ring = ring.expand(B, -1).clone()
    ring[(ring - pad[:, None]) < ns] = -1  # a sink (or padding) is held in its sink slot only
    new_idx = torch.cat([sinks, ring], dim=1)  # (B, ns + nr)
    match = (new_idx[:, :, None] == cand[:, None, :]) & (new_idx[:, :, None] >= 0)
    pos = match.to(torch.int8).argmax(dim=-1)
    return new_idx, pos
