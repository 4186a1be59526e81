"""PoD attention for one new token (decode), reading every key and value where it is stored.

The chunked path (:mod:`podkv.attention.chunked`) builds one key list [proximal | distant] and runs
one SDPA. That suits prefill, but in decode it copies all T anchor keys and values every step —
which made PoD decode ~1.3-1.45x dense. Here nothing of length T is copied:

  * heads that are their own anchor: one SDPA over their stored keys. Proximal ∪ distant is every
    position and both use the head's own keys, so this *is* dense attention, exactly;
  * heads that share keys: a proximal pass (held sink/window keys + the new key) and a distant pass
    over the anchor layer's stored keys [lo, hi), merged by their log-sum-exp. That is the same
    single softmax (paper §2.2: o = g·oP + (1−g)·oD with g = σ(lseP − lseD));
  * window-only heads (plan policy "window"): the proximal pass alone.

A :class:`SkipPolicy` (gate skipping, :mod:`podkv.attention.gate_skip`) may drop the distant pass
of a shared head; it predicts from the anchor heads' gates, which a small extra proximal pass gives.
"""

from __future__ import annotations

from typing import Protocol

import torch

from podkv.attention.heads import head_runs, put_heads, select_heads
from podkv.attention.lse import attend_lse, merge_lse, to_bias
from podkv.attention.reference import allowed_mask, distant_span, proximal_mask


class SkipPolicy(Protocol):
    """What :func:`pod_decode` asks a gate-skipping policy (see gate_skip.py)."""

    def skip(self, layer: int, head: int, anchor: int, lse_prox: torch.Tensor) -> torch.Tensor:
        """(B, G) bool: rows whose distant pass is skipped for this shared head."""

    def anchor_gate(self, layer: int, head: int, gate: torch.Tensor, lse_dist: torch.Tensor) -> None:
        """Record an anchor head's gate and distant log-mass of this step, (B, G) each."""

    def skipped(self, passes: int) -> None:
        """Count distant passes that were not run at all."""


def decode_applies(step, query: torch.Tensor, anchor_query) -> bool:
    """A one-token step after prefill, in "keys" mode: what :func:`pod_decode` computes."""
    return query.shape[2] == 1 and anchor_query is None and step.i0 > 0


def pod_decode(step, query: torch.Tensor, key: torch.Tensor, scale: float,
               policy: SkipPolicy | None = None) -> torch.Tensor:
    """query (B, Hq, 1, D), key (B, H, 1, D) just added by ``PodCache.update`` (``step``: its PodStep)
    -> (B, Hq, 1, D)."""
    cache, store, layer = step.cache, step.store, step.layer
    B, Hq, _, D = query.shape
    H = key.shape[1]
    qg = query.reshape(B, H, Hq // H, D)  # the G query heads of a KV head act as G queries
    out = torch.empty(B, H, Hq // H, D, dtype=torch.float32, device=query.device)

    whole = store.anchor_heads
    if whole:
        lo, bias = _real_keys(cache, store.seen)
        lse = torch.empty(B, H, Hq // H, dtype=torch.float32, device=query.device)
        for (p0, p1), (j0, j1) in head_runs(whole, list(range(len(whole)))):
            h0, h1 = whole[p0], whole[p0] + p1 - p0
            out[:, h0:h1], lse[:, h0:h1] = attend_lse(qg[:, h0:h1], store.k_full[:, j0:j1, lo:store.seen],
                                                   store.values_of(h0, h1)[:, :, lo:store.seen], scale, bias)
        if policy is not None:
            _report_anchor_gates(step, qg, key, whole, lse, scale, policy)
    if store.ring_heads:
        _split_heads(step, qg, key, scale, policy, out)
    return out.reshape(B, Hq, 1, D).to(query.dtype)


def _report_anchor_gates(step, qg, key, heads, lse_all, scale, policy):
    """Gate of each anchor head (proximal share of its attention mass) for gate skipping in later
    layers: a small proximal pass gives lseP, and g = exp(lseP − lse_all)."""
    cache, store, layer, i = step.cache, step.store, step.layer, step.i0
    lo, hi = distant_span(cache.pad_min, i, cache.plan.ns, cache.plan.nr)
    if hi <= lo:
        return  # no distant keys yet
    held_k, held_v, held_idx = step.held()
    k_p = torch.cat([held_k[:, heads], key[:, heads, -1:]], dim=2)
    v_p = torch.cat([held_v[:, heads], step.values_new[:, heads, -1:]], dim=2)
    _, lse_p = attend_lse(qg[:, heads], k_p, v_p, scale, _proximal_bias(cache, held_idx, i))
    gate = torch.exp(lse_p - lse_all[:, heads]).clamp(max=1.0)
    lse_d = lse_all[:, heads] + torch.log1p(-gate)  # -inf where the distant mass is 0
    for n, h in enumerate(heads):
        policy.anchor_gate(layer, h, gate[:, n], lse_d[:, n])


def _split_heads(step, qg, key, scale, policy, out):
    """Proximal pass + distant pass over the anchor's keys, LSE-merged, for the layer's shared heads; the
    proximal pass alone for its window-only heads."""
    cache, store, layer = step.cache, step.store, step.layer
    plan, heads = cache.plan, store.ring_heads
    i = step.i0  # cache index of the query
    held_k, held_v, held_idx = step.held_ring()
    k_p = torch.cat([held_k, select_heads(key, heads)[:, :, -1:]], dim=2)  # (B, h, n+1, D): small
    v_p = torch.cat([held_v, select_heads(step.values_new, heads)[:, :, -1:]], dim=2)
    out_p, lse_p = attend_lse(select_heads(qg, heads), k_p, v_p, scale, _proximal_bias(cache, held_idx, i))

    lo, hi = distant_span(cache.pad_min, i, plan.ns, plan.nr)
    if hi <= lo:  # every key is proximal
        put_heads(out, heads, out_p)
        return
    anchors = plan.anchors[layer]
    skip = {}
    shared = [n for n, h in enumerate(heads) if anchors[h] != layer]  # not window-only
    if policy is not None:
        skip = {heads[n]: policy.skip(layer, heads[n], anchors[heads[n]], lse_p[:, n]) for n in shared}
    need = [n for n in shared if heads[n] not in skip or not bool(skip[heads[n]].all())]  # positions in heads
    if policy is not None:
        policy.skipped(len(shared) - len(need))
    sources = {n: cache.layers[anchors[heads[n]]].anchor_source(heads[n]) for n in need}
    bias = _distant_bias(cache, lo, hi)
    merged = out_p
    for (p0, p1), (j0, j1) in head_runs([heads[n] for n in need], [sources[n][1] for n in need],
                                    [id(sources[n][0]) for n in need]):
        n0, n1 = need[p0], need[p0] + p1 - p0  # consecutive heads of a run are consecutive positions too
        h0 = heads[n0]
        o_d, lse_d = attend_lse(qg[:, h0:h0 + n1 - n0], sources[n0][0][:, j0:j1, lo:hi],
                                store.values_of(h0, h0 + n1 - n0)[:, :, lo:hi], scale, bias)
        m, _ = merge_lse(out_p[:, n0:n1], lse_p[:, n0:n1], o_d, lse_d)
        if merged is out_p and (n0, n1) != (0, len(heads)):
            merged = out_p.clone()
        merged[:, n0:n1] = m
    for n, h in enumerate(heads):
        if h in skip:
            merged[:, n] = torch.where(skip[h][..., None], out_p[:, n], merged[:, n])
    put_heads(out, heads, merged)


def _real_keys(cache, T: int):
    """Keys [lo, T) a whole-sequence pass reads, and a padding bias (B, 1, 1, T-lo) when rows differ."""
    pad = cache.pad
    if cache.pad_uniform:
        return cache.pad_min, None
    return cache.pad_min, cache.per_step("real_bias", lambda: to_bias(
        torch.arange(cache.pad_min, T, device=pad.device)[None] >= pad[:, None])[:, None, None])


def _proximal_bias(cache, held_idx: torch.Tensor, i: int):
    """Bias (B, 1, 1, n+1) of the proximal pass: held slots that are real, causal and proximal, + the query itself."""
    def build():
        idx = torch.cat([held_idx, held_idx.new_full((held_idx.shape[0], 1), i)], dim=1)
        qi = torch.tensor([i], device=idx.device)
        keep = allowed_mask(idx, qi, cache.pad) & proximal_mask(idx, qi, cache.pad, cache.plan.ns, cache.plan.nr)
        return None if bool(keep.all()) else to_bias(keep[:, 0])[:, None, None]
    return cache.per_step("proximal_bias", build)


def _distant_bias(cache, lo: int, hi: int):
    """Bias (B, 1, 1, hi-lo) hiding a row's padding and sinks when rows are padded differently."""
    pad = cache.pad
    if cache.pad_uniform:
        return None
    return cache.per_step("distant_bias", lambda: to_bias(
        (torch.arange(lo, hi, device=pad.device)[None] - pad[:, None]) >= cache.plan.ns)[:, None, None])
