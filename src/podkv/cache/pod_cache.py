"""`PodCache`: a transformers `Cache` that holds distant keys once per block (paper §2.3).

Per layer it holds
  * values of every token for every KV head except window-only ones (``v``, B x Hv x T x D, heads in
    ``value_heads`` order);
  * keys of every token for the heads that are their own anchor (``k_full``, B x Ha x T x D);
  * for the other heads only proximal keys (``k_prox``, B x Hn x min(T, ns+nr+M) x D, heads in
    ``ring_heads`` order): ``ns`` sink slots and a ring of the last ``nr + M`` tokens (``M = crop_margin``),
    at cache indices ``prox_idx`` (B x n), -1 = empty (layout in :mod:`podkv.cache.window`);
  * for window-only heads (plan policy "window", issue 21) their values in the same slots (``v_prox``).
Distant keys of a sharing head are read from its anchor layer's ``k_full`` at attention time.
With ``kv_bits=8``, ``4`` or ``2`` the token-long tensors ``v`` and ``k_full`` are held in that many bits
(:mod:`podkv.cache.quant`; indexing them dequantises what is read); the small proximal ring stays in the model's dtype.

The model calls ``update`` right before attention. ``update`` appends what is kept in full, moves the
proximal window over the new tokens, and returns the values with a :class:`PodStep` attached
(``values.pod_step``): the one object PoD attention reads — the store, the step's cache indices, and
the window as it was before the step. No state is left pending between the two calls. The left
padding the window needs is set from the forward's mask before the first layer runs
(:mod:`podkv.models.forward_scope`).

Cache contract used by ``generate``: ``crop`` (assisted and prompt-lookup decoding drop rejected
candidates), ``reorder_cache`` (beam search), ``batch_repeat_interleave``, ``batch_select_indices``,
``reset``, ``max_batch_size``.

Cropping is exact or an error. Values and anchor keys are kept for every token, so they crop
exactly; a sharing head's own key of a token that left its ring is gone for good. ``crop(L)`` needs
the keys of what the next query reads as proximal (the sinks and tokens [L-nr+1, L)), which the ring
holds for a crop of at most ``M + 1`` tokens; a deeper crop raises :class:`PodError`. The margin
costs ``M`` keys per (sharing layer, KV head, batch row), counted by ``kv_bytes`` and by
:func:`podkv.cache.memory.pod_kv_bytes`; ``generate`` sizes it by itself when it will crop
(:mod:`podkv.models.enable`). Default 0: plain decoding pays nothing.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from podkv import compat
from podkv.attention.heads import stacked_runs, unstack
from podkv.cache import window
from podkv.cache.quant import BITS, GROUP, QuantChannels, QuantStore, QuantTokens, check_bits
from podkv.cache.window import transition as _proximal_transition  # noqa: F401  (selection.py)
from podkv.errors import PodError
from podkv.plan import SharingPlan


class PodLayer(compat.CacheLayer):
    """One layer's PoD storage. Shapes in the module docstring."""

    is_sliding = False
    is_compileable = False
    is_croppable = True  # read by later transformers 5.x: a one-step rollback (crop by 1) is always exact

    def __init__(self, cache: PodCache, layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        plan = cache.plan
        self.anchor_heads = plan.anchor_heads(layer_idx)
        self.shared_heads = plan.shared_heads(layer_idx)
        self.window_heads = plan.window_heads(layer_idx)
        self.ring_heads = sorted(self.shared_heads + self.window_heads)  # keys in k_prox
        self.value_heads = sorted(self.anchor_heads + self.shared_heads)  # values of every token, in v
        self.vrow = {h: n for n, h in enumerate(self.value_heads)}  # KV head -> its row of v
        self.wrow = {h: n for n, h in enumerate(self.window_heads)}  # window-only KV head -> its row of v_prox
        stored = self.anchor_heads + self.ring_heads  # held() stacks [anchor | ring] keys; this undoes it
        self.key_runs = stacked_runs([stored.index(h) for h in range(len(stored))], len(self.anchor_heads))
        stored = self.value_heads + self.window_heads  # ... and [v | v_prox] values
        self.value_runs = stacked_runs([stored.index(h) for h in range(len(stored))], len(self.value_heads))
        self.clear()

    def clear(self) -> None:
        """Back to empty (``reset``)."""
        self.v: torch.Tensor | None = None
        self.k_full: torch.Tensor | None = None
        self.k_prox: torch.Tensor | None = None
        self.v_prox: torch.Tensor | None = None
        self.prox_idx: torch.Tensor | None = None  # (B, n) cache index of each k_prox slot, -1 = empty
        self.seen = 0
        self._v_room = self._k_room = None  # buffers that v / k_full are prefixes of (see _append)
        self.is_initialized = False

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        B, _, _, D = key_states.shape
        self.v = value_states.new_zeros(B, len(self.value_heads), 0, value_states.shape[-1])
        if self.anchor_heads:
            self.k_full = key_states.new_zeros(B, len(self.anchor_heads), 0, D)
        if self.cache.kv_bits:
            bits, group = self.cache.kv_bits, self.cache.kv_group
            keys = QuantChannels if self.cache.key_quant == "channel" else QuantTokens
            first = self.cache.plan.ns if self.cache.kv_keep_proximal else 0
            self.v = QuantTokens(self.v, group, bits, first)
            self.k_full = None if self.k_full is None else keys(self.k_full, group, bits, first)
        if self.ring_heads:
            self.k_prox = key_states.new_zeros(B, len(self.ring_heads), 0, D)
        if self.window_heads:
            self.v_prox = value_states.new_zeros(B, len(self.window_heads), 0, value_states.shape[-1])
        self.prox_idx = torch.zeros(B, 0, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """key/value_states (B, H, C, D) -> (new keys, all values); the values carry the step (``.pod_step``,
        a :class:`PodStep`): everything PoD attention reads. The store is complete when this returns."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.cache.pad is None:  # set from the forward's mask by models/forward_scope.py; else no padding
            self.cache.pad = torch.zeros(key_states.shape[0], dtype=torch.long, device=key_states.device)
        i0, i1 = self.seen, self.seen + key_states.shape[2]
        # the window held before this step, and the step's values of every head
        step = PodStep(self.cache, self, i0, i1, self.k_prox, self.prox_idx, self.v_prox, value_states)
        if isinstance(self.v, QuantStore):
            last = self.cache.window if self.cache.kv_keep_proximal else 0
            self.v.append(_heads(value_states, self.value_heads), last)
            if self.anchor_heads:
                self.k_full.append(_heads(key_states, self.anchor_heads), last)
        else:
            self._v_room, self.v = _append(self._v_room, self.v, _heads(value_states, self.value_heads))
            if self.anchor_heads:
                self._k_room, self.k_full = _append(self._k_room, self.k_full, _heads(key_states, self.anchor_heads))
        self.seen = i1
        self.cache.step = (i0, i1)
        self._roll(i0, i1, _heads(key_states, self.ring_heads) if self.ring_heads else None,
                   _heads(value_states, self.window_heads) if self.window_heads else None)
        # a fresh view for this step: what the step is attached to (attention reads the step, not the tensor)
        values = value_states[:, :, :] if isinstance(self.v, QuantStore) else self.v[:, :, :]
        values.pod_step = step
        return key_states, values

    def _roll(self, i0: int, i1: int, new_keys: torch.Tensor | None, new_values: torch.Tensor | None) -> None:
        """Move the proximal window over tokens [i0, i1): sinks + the last ``nr + M`` (:mod:`podkv.cache.window`)."""
        new_idx, pos = self.cache.transition(i0, i1, self.prox_idx if i0 else None)
        if new_keys is not None:
            self.k_prox = _take_slots(torch.cat([self.k_prox, new_keys], dim=2), pos, self.cache.slot_runs(pos))
        if new_values is not None:
            self.v_prox = _take_slots(torch.cat([self.v_prox, new_values], dim=2), pos, self.cache.slot_runs(pos))
        self.prox_idx = new_idx

    def values_of(self, h0: int, h1: int) -> torch.Tensor:
        """``v`` of the consecutive KV heads [h0, h1), none of them window-only: a view (B, h1 - h0, T, D)."""
        r = self.vrow[h0]
        return self.v[:, r:r + h1 - h0]

    def anchor_source(self, head: int) -> tuple[torch.Tensor, int]:
        """(k_full tensor, index in it) of this layer for a head it anchors."""
        return self.k_full, self.anchor_heads.index(head)

    # ------------------------------------------------------------ bookkeeping
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query) -> tuple[int, int]:
        return self.seen + compat.query_length(query), 0

    def get_max_length(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        """Batch rows held; -1 before the first update (transformers' convention)."""
        return -1 if self.v is None else self.v.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for t in (self.v, self.k_full, self.k_prox, self.v_prox):
            out += t.tensors() if isinstance(t, QuantStore) else [] if t is None else [t]
        return out

    def reserved_bytes(self) -> int:
        """Bytes allocated, spare room of the growth buffers included (at most GROWTH tokens per tensor)."""
        if isinstance(self.v, QuantStore):
            fp = [self.k_prox, self.v_prox]
            return sum(t.numel() * t.element_size() for t in fp if t is not None) + sum(
                t.reserved_bytes() for t in (self.v, self.k_full) if t is not None)
        held = [self.k_prox, self.v_prox] + [room if room is not None and t is not None and t.data_ptr() == room.data_ptr() else t
                                for room, t in ((self._v_room, self.v), (self._k_room, self.k_full))]
        return sum(t.numel() * t.element_size() for t in held if t is not None)


class PodStep:
    """What PoD attention reads for one layer and step, handed over by :meth:`PodLayer.update` with the values:
    the store (``k_full`` and ``v`` already hold the step's tokens), the step's cache indices [i0, i1), the
    step's values of every KV head (``values_new``, B x H x L x D), and the proximal window as it was *before*
    the step (the ring heads' keys, the window heads' values and the slot indices). Nothing is left to do
    afterwards: the store has already moved its window.
    """

    __slots__ = ("cache", "store", "i0", "i1", "k_prox", "idx", "v_prox", "values_new")

    def __init__(self, cache: PodCache, store: PodLayer, i0: int, i1: int, k_prox, idx, v_prox=None, values_new=None):
        self.cache, self.store, self.i0, self.i1, self.k_prox, self.idx = cache, store, i0, i1, k_prox, idx
        self.v_prox, self.values_new = v_prox, values_new

    @property
    def layer(self) -> int:
        return self.store.layer_idx

    def held(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Proximal keys and values held before this step, for every KV head: (B, H, n, D) x2, idx (B, n)."""
        store, idx = self.store, self.idx
        runs = self.cache.slot_runs(idx)
        values = _take_slots(store.v, idx, runs)
        if store.window_heads:
            values = unstack((values, self.v_prox), store.value_runs)  # [v | v_prox] -> head order
        if not store.anchor_heads:
            return self.k_prox, values, idx
        anchor_keys = _take_slots(store.k_full, idx, runs)
        if not store.ring_heads:
            return anchor_keys, values, idx
        return unstack((anchor_keys, self.k_prox), store.key_runs), values, idx  # [anchor | ring] -> head order

    def held_ring(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`held` for the ring heads only (shared and window-only, ``ring_heads`` order), without gathering
        anchor keys."""
        store, idx = self.store, self.idx
        B, n = idx.shape
        gather = idx.clamp(min=0)[:, None, :, None].expand(B, 1, n, store.v.shape[-1])
        window = store.wrow
        values = torch.cat([self.v_prox[:, window[h]:window[h] + 1] if h in window else
                            torch.gather(store.values_of(h, h + 1), 2, gather) for h in store.ring_heads], dim=1)
        return self.k_prox, values, idx


class PodCache(Cache):
    """KV cache for a PoD model: ``model.generate(..., past_key_values=PodCache(model.config, plan))``.

    Parameters
    ----------
    config : PretrainedConfig
        The model's config; the plan is validated against it.
    plan : SharingPlan, optional
        Defaults to ``config.pod_plan`` (set by :func:`podkv.enable_pod`).
    crop_margin : int
        Extra recent keys kept per sharing head so that ``crop`` can go back ``crop_margin + 1``
        tokens exactly (module docstring). ``generate`` raises it when it needs to.
    kv_bits : None, 8, 4 or 2
        Hold the token-long values and anchor keys in that many bits, groups of ``kv_group`` channels
        (:mod:`podkv.cache.quant`; 8/bits channels share a byte, so the head dim must be a multiple of that);
        None: the model's dtype.
    key_quant : "token" or "channel"
        How the quantised anchor keys are grouped: "token" as the values (``kv_group`` channels of one token),
        "channel" as KIVI (one channel over ``kv_group`` tokens; the last unfilled group stays in the model's dtype).
    kv_keep_proximal : bool
        With ``kv_bits``: the first ``ns`` and the last ``nr + crop_margin`` tokens of the quantised tensors stay in
        the model's dtype (PoD's proximal tokens; KIVI's full-precision residual), the rest is coded as it leaves.
    """

    def __init__(self, config, plan: SharingPlan | None = None, crop_margin: int = 0, kv_bits: int | None = None,
                 kv_group: int = 64, key_quant: str = "token", kv_keep_proximal: bool = False):
        from podkv.plan import plan_from_config

        plan = plan or plan_from_config(config)
        if plan is None:
            raise PodError("PodCache needs a plan: pass one, or call podkv.enable_pod(model, plan) first")
        plan.validate_for(config)
        if not isinstance(crop_margin, int) or isinstance(crop_margin, bool) or crop_margin < 0:
            raise PodError(f"PodCache field 'crop_margin' must be an integer >= 0, got {crop_margin!r}")
        if kv_bits is not None and kv_bits not in BITS:
            raise PodError(f"PodCache field 'kv_bits' = {kv_bits!r}: supported are None (the model's dtype), "
                           f"{', '.join(map(str, BITS))}")
        if not isinstance(kv_group, int) or kv_group < 1:
            raise PodError(f"PodCache field 'kv_group' must be a positive integer, got {kv_group!r}")
        if key_quant not in KEY_QUANT:
            raise PodError(f"PodCache field 'key_quant' = {key_quant!r}: choose from {', '.join(KEY_QUANT)}")
        if not kv_bits and (key_quant != "token" or kv_keep_proximal):
            field, value = ("key_quant", key_quant) if key_quant != "token" else ("kv_keep_proximal", kv_keep_proximal)
            raise PodError(f"PodCache field '{field}' = {value!r} sets how quantized tensors are held: it needs "
                           f"kv_bits (one of {', '.join(map(str, BITS))})")
        if kv_bits:
            from podkv.cache.memory import head_dim

            if head_dim(config) % kv_group:
                raise PodError(f"PodCache field 'kv_group' = {kv_group} must divide the head dim {head_dim(config)}")
            check_bits(head_dim(config), kv_bits)
        self.plan, self.crop_margin, self.kv_bits, self.kv_group = plan, crop_margin, kv_bits, kv_group
        self.key_quant, self.kv_keep_proximal = key_quant, bool(kv_keep_proximal)
        self.pad = None  # (B,) left-padding counts, fixed at prefill (see the property)
        self.in_forward = 0  # forwards of a PoD model using this cache right now (forward_scope.py)
        self.dropped = 0  # tokens removed by token selection (selection.compact): positions run ahead by this
        self.reset_step_state()
        super().__init__(layers=[PodLayer(self, i) for i in range(plan.num_layers)])

    @property
    def window(self) -> int:
        """Ring slots of a sharing head: the proximal window nr plus the crop margin."""
        return self.plan.nr + self.crop_margin

    def reserve_crop_margin(self, margin: int) -> None:
        """Keep at least ``margin`` extra recent keys from now on (tokens already evicted stay evicted)."""
        if margin > self.crop_margin:
            self.crop_margin = margin
            self.reset_step_state()

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not self.in_forward:
            raise PodError(f"PodCache.update(layer_idx={layer_idx}) outside a forward of a PoD model: a PodCache "
                           "only works with a model prepared by podkv.enable_pod(model, plan); a stock model needs "
                           "a DynamicCache")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def check_ready(self) -> None:
        """Raise if a previous forward stopped half-way (layers of different lengths cannot continue)."""
        if len({layer.seen for layer in self.layers}) > 1:
            raise PodError("this PodCache was left half-updated (a forward failed part-way); start a new PodCache")

    def transition(self, before: int, after: int, old_idx) -> tuple[torch.Tensor, torch.Tensor]:
        """New proximal slot indices (B, n) and, for each, its position among [old slots | new tokens].

        The same for every layer, so it is computed once per step.
        """
        key = (before, after)
        if key not in self._transitions:
            self._transitions = {key: window.transition(old_idx, before, after, self.pad, self.plan.ns, self.window)}
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
        """Forget per-step memos (after the cache was edited in place: crop, reorder, compaction)."""
        self._transitions, self.step, self._per_step, self._runs = {}, None, (None, {}), {}

    def slot_runs(self, slots: torch.Tensor) -> list[tuple[int, int]] | None:
        """:func:`slot_runs` of a slot-index tensor, once per tensor: every layer of a step gathers with the
        same one (the step's :meth:`transition` is shared), so the few small ops and the sync run once."""
        hit = self._runs.get(id(slots))
        if hit is None or hit[0] is not slots or hit[1] != slots._version:  # _version: edited in place
            if len(self._runs) > 8:
                self._runs = {}
            hit = self._runs[id(slots)] = (slots, slots._version, slot_runs(slots))
        return hit[2]

    def per_step(self, name: str, build):
        """``build()`` once per forward step, shared by all layers (masks and indices depend only on
        the step, not the layer)."""
        if self._per_step[0] != self.step:
            self._per_step = (self.step, {})
        memo = self._per_step[1]
        if name not in memo:
            memo[name] = build()
        return memo[name]

    # ------------------------------------------------------- cache contract
    def crop(self, n: int) -> None:
        """transformers' ``crop``: ``n < 0`` drops ``-n`` tokens; ``n >= 0`` keeps ``n`` tokens on releases
        whose crop keeps a length (5.2), and is a no-op (0) or an error on later ones (compat.py).

        Exact, or a PodError when the ring no longer holds a needed key (module docstring).
        """
        if compat.CROP_KEEPS_LENGTH and n >= 0:
            self.crop_to(n)
        elif n > 0:
            raise PodError(f"PodCache.crop({n}): pass 0 or a negative number of tokens to remove")
        else:
            self.crop_to(self.get_seq_length() + n)

    def crop_to(self, length: int) -> None:
        """Keep tokens [0, length) in every layer."""
        seen = self.get_seq_length()
        if length >= seen:
            return
        if length <= 0:
            self.reset()
            return
        self.check_ready()
        new_idx, pos = window.crop(self.layers[0].prox_idx, length, self.pad, self.plan.ns, self.plan.nr, self.window)
        for layer in self.layers:
            if isinstance(layer.v, QuantStore):
                for t in (layer.v, layer.k_full):
                    if t is not None:
                        t.crop(length)
            else:
                layer.v = layer.v[:, :, :length]
                if layer.k_full is not None:
                    layer.k_full = layer.k_full[:, :, :length]
            if layer.k_prox is not None:
                layer.k_prox = _take_slots(layer.k_prox, pos)
            if layer.v_prox is not None:
                layer.v_prox = _take_slots(layer.v_prox, pos)
            layer.prox_idx, layer.seen = new_idx, length
        self.reset_step_state()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b becomes row ``beam_idx[b]``, in every tensor, slot index and padding count."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def _map_batch(self, fn) -> None:
        if not any(layer.is_initialized for layer in self.layers):
            return
        self.check_ready()
        slots = {}  # prox_idx is one tensor shared by all layers: map it once
        for layer in self.layers:
            for name in ("v", "k_full", "k_prox", "v_prox"):
                t = getattr(layer, name)
                if isinstance(t, QuantStore):
                    t.map_batch(fn)
                elif t is not None:
                    setattr(layer, name, fn(t))
            if id(layer.prox_idx) not in slots:
                slots[id(layer.prox_idx)] = (layer.prox_idx, fn(layer.prox_idx))  # keeps the old one alive
            layer.prox_idx = slots[id(layer.prox_idx)][1]
        if self.pad is not None:
            self.pad = fn(self.pad)
        self.reset_step_state()

    @property
    def max_batch_size(self) -> int:
        """Batch rows held; -1 before the first update. (Later transformers releases call it ``batch_size``.)"""
        return self.layers[0].batch_size

    def reset(self) -> None:
        """Empty every layer (the object can take a new prompt; the plan and margin stay)."""
        for layer in self.layers:
            layer.clear()
        self.pad = None
        self.reset_step_state()

    # --------------------------------------------------------------- memory
    def kv_bytes(self) -> int:
        """Bytes held by key and value tensors right now (index bookkeeping excluded)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def reserved_bytes(self) -> int:
        """Bytes allocated for keys and values, growth room included (:func:`_append`); ``kv_bytes`` counts
        only the tokens held, which is what the analytic formula describes."""
        return sum(layer.reserved_bytes() for layer in self.layers)

    def index_bytes(self) -> int:
        """Bytes of the (B, ns+nr+M) slot-index tensors: bookkeeping, shared by all layers."""
        idx = self.layers[0].prox_idx
        return 0 if idx is None else idx.numel() * idx.element_size()


KEY_QUANT = ("token", "channel")


def storage(config, kv_bits: int | None, key_quant: str = "token", keep_proximal: bool = False) -> dict:
    """PodCache / ``pod_kv_bytes`` keywords for ``kv_bits`` (None, 8, 4 or 2): groups of :data:`GROUP` channels,
    or the head dim if smaller; with ``key_quant="channel"`` the keys' groups are that many tokens of one channel;
    ``keep_proximal``: the proximal tokens stay in the model's dtype."""
    from podkv.cache.memory import head_dim

    if kv_bits is None:  # a layout without bits goes on to PodCache, which refuses it in one line
        return {} if (key_quant, keep_proximal) == ("token", False) else {"key_quant": key_quant,
                                                                          "kv_keep_proximal": keep_proximal}
    return {"kv_bits": kv_bits, "kv_group": min(GROUP, head_dim(config)), "key_quant": key_quant,
            "kv_keep_proximal": keep_proximal}


def pod_cache_for(config, plan: SharingPlan, kv_bits: int | None = None, key_quant: str = "token",
                  keep_proximal: bool = False, **kw) -> PodCache:
    """The PodCache a PoD model makes when the caller gives none: ``plan``, in ``kv_bits``."""
    return PodCache(config, plan, **storage(config, kv_bits, key_quant, keep_proximal), **kw)


GROWTH = 128  # tokens of spare room a value/key buffer grows by


def _append(room: torch.Tensor | None, held: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``new`` (B, H, C, D) to ``held`` along the token dim -> (buffer, held + new as a view of it).

    Why: ``torch.cat`` per decode step copies the whole cache (T tokens) to add one; here a step writes
    its token into spare room, and a copy happens once every GROWTH tokens. ``held`` must be a prefix
    view of ``room`` to grow in place; anything else (a crop, a batch edit, a compaction made a new
    tensor) starts a new buffer.
    """
    n, C = held.shape[2], new.shape[2]
    fits = (room is not None and held.numel() and held.data_ptr() == room.data_ptr() and held.shape[:2] == room.shape[:2]
            and held.stride() == room.stride() and room.shape[2] >= n + C)
    if not fits:
        B, H, _, D = new.shape
        room = new.new_empty(B, H, n + C + GROWTH, D)
        room[:, :, :n] = held
    room[:, :, n:n + C] = new
    return room, room[:, :, :n + C]


def _heads(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    if heads == list(range(x.shape[1])):
        return x
    return x[:, heads]


def slot_runs(slots: torch.Tensor) -> list[tuple[int, int]] | None:
    """Slot indices (B, n) shared by every row -> their runs of consecutive indices, [(start, stop), ...];
    None when rows differ. Empty slots (-1) read index 0: attention masks them anyway.

    Why: the proximal slots are a few runs (sinks, then the ring in two pieces), and copying a few
    slices is several times cheaper on CPU than ``index_select`` of the same rows (issue 19's
    batch-1 profile: about 0.3 ms per call at 4K, three calls per layer and step).
    """
    if slots.shape[0] > 1 and not bool((slots == slots[:1]).all()):
        return None
    row = slots[0].clamp(min=0)
    if row.numel() == 0:
        return []
    cut = ((row[1:] - row[:-1]) != 1).nonzero().flatten().add_(1).tolist()
    bounds = [0, *cut, row.numel()]
    firsts = row[bounds[:-1]].tolist()
    return [(f, f + b - a) for f, a, b in zip(firsts, bounds[:-1], bounds[1:])]


def _take_slots(x: torch.Tensor, pos: torch.Tensor, runs: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """x (B, H, K, D), pos (B, n) -> (B, H, n, D); -1 reads index 0. ``runs``: :func:`slot_runs` of
    ``pos`` (slices, the common case); without them rows with the same slots take one ``index_select``, and
    rows that differ (padding) an element-wise ``gather``."""
    if runs is not None:
        parts = [x[:, :, a:b] for a, b in runs] or [x[:, :, :0]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    if isinstance(x, QuantStore):
        x = x[:, :]  # padded rows gather element-wise: dequantise the rows first
    pos = pos.clamp(min=0)
    if pos.shape[0] == 1 or bool((pos == pos[:1]).all()):
        return x.index_select(2, pos[0])
    B, H, _, D = x.shape
    return torch.gather(x, 2, pos[:, None, :, None].expand(B, H, pos.shape[1], D))
