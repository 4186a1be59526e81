"""Token selection on top of a PodCache: PoD + SnapKV (paper §3.4: 91.9% of the KV saved together).

PoD and token eviction are orthogonal: PoD stores distant *keys* once per block, SnapKV keeps only
the distant *tokens* a prompt's last queries attend to. Combined, after prefill:

  * scores: each layer's last ``window`` queries attend to the distant candidates [ns, T−nr) with
    the keys that layer really uses for them (its block anchor's), softmax over the candidates,
    averaged over the window and the query heads of a KV head, then smoothed (SnapKV's pooling);
  * one choice per (block, KV head): the scores of the block's layers are summed, and the top
    ``keep`` candidates are kept — a block must keep the same tokens in every layer, because its
    layers read the anchor's keys at the same cache index as their own values;
  * compaction: sinks, the kept tokens (in order) and the last nr tokens become a cache of length
    ns + keep + nr, with the same layout as an uncompacted PodCache of that length, so attention
    and decoding run unchanged. Positions of later tokens must be passed explicitly (the cache is
    shorter than the prompt), as for any evicting cache (see eval/generation.py). The cache records
    how many tokens it dropped (``PodCache.dropped``); a forward on it without ``position_ids`` is
    refused (models/forward_scope.py), since the cache length would give later tokens wrong RoPE
    positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from podkv.attention.reference import distant_span
from podkv.errors import PodError


def kept_tokens_for_budget(config, plan, seq_len: int, budget: float) -> int:
    """Largest compacted length T' <= seq_len whose PoD KV bytes fit ``budget`` x the dense bytes at seq_len."""
    from podkv.cache.memory import dense_kv_bytes, pod_kv_bytes

    limit = budget * dense_kv_bytes(config, seq_len)
    floor = min(seq_len, plan.ns + plan.nr)
    if pod_kv_bytes(config, plan, floor) > limit + 1e-9:
        raise PodError(f"method 'pod+snapkv' cannot meet --budget {budget} at {seq_len} tokens: even the "
                       f"{floor} proximal tokens alone hold {pod_kv_bytes(config, plan, floor) / dense_kv_bytes(config, seq_len):.3f} "
                       "of the dense KV; raise --budget or use a smaller ns/nr")
    lo, hi = floor, seq_len
    while lo < hi:  # bytes grow with the length: binary search the last length that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if pod_kv_bytes(config, plan, mid) <= limit + 1e-9 else (lo, mid - 1)
    return lo


def snapkv_select(cache, window_queries: dict, scale: float, keep: int, kernel: int = 5) -> dict:
    """Kept distant cache indices per (anchor layer, KV head): {(a, h): LongTensor (B, keep), sorted}.

    ``window_queries[layer]``: (B, Hq, w, D) queries (after RoPE) of the prompt's last w tokens.
    """
    plan = cache.plan
    T = cache.layers[0].seen
    lo, hi = distant_span(0, T - 1, plan.ns, plan.nr)  # compaction takes unpadded prompts only
    if keep >= hi - lo:
        return {}
    totals: dict[tuple[int, int], torch.Tensor] = {}
    for layer, anchors in enumerate(plan.anchors):
        q = window_queries[layer]
        B, Hq, w, D = q.shape
        G = Hq // len(anchors)
        for h, a in enumerate(anchors):
            keys, j = cache.layers[a].anchor_source(h)
            s = torch.matmul(q[:, h * G:(h + 1) * G].float(), keys[:, j, lo:hi].float().transpose(-1, -2)[:, None]) * scale
            score = s.softmax(-1).mean(dim=(1, 2))  # (B, M): share of the window's distant attention
            score = F.avg_pool1d(score[:, None], kernel, stride=1, padding=kernel // 2, count_include_pad=False)[:, 0]
            totals[(a, h)] = totals.get((a, h), 0) + score
    return {key: torch.topk(total, keep, dim=-1).indices.sort(dim=-1).values + lo for key, total in totals.items()}


def compact(cache, kept: dict) -> None:
    """Drop every distant token not in ``kept`` (from :func:`snapkv_select`) from all layers, in place."""
    from podkv.cache.pod_cache import _proximal_transition

    if not kept:
        return
    plan = cache.plan
    if cache.kv_bits:
        raise PodError(f"pod+snapkv compaction does not support a quantized PodCache (kv_bits={cache.kv_bits}) yet")
    if plan.has_window:
        raise PodError("pod+snapkv compaction does not support plans with window-only pairs (policy 'window') yet")
    if cache.pad is None or bool(cache.pad.any()):
        raise PodError("pod+snapkv compaction supports unpadded prompts only (batch rows of equal length)")
    T = cache.layers[0].seen
    device = cache.pad.device
    B = cache.pad.shape[0]
    sinks = torch.arange(plan.ns, device=device).expand(B, -1)
    recent = torch.arange(T - plan.nr, T, device=device).expand(B, -1)
    order = {key: torch.cat([sinks, idx, recent], dim=1) for key, idx in kept.items()}  # (B, T') old indices
    T_new = next(iter(order.values())).shape[1]
    new_idx, _ = _proximal_transition(None, 0, T_new, cache.pad, plan.ns, plan.nr)
    old_of_new = torch.where(new_idx < plan.ns, new_idx, new_idx + (T - T_new))  # ring slots hold the last nr
    for layer, store in enumerate(cache.layers):
        anchors = plan.anchors[layer]
        store.v = torch.stack([_take(store.v[:, h], order[(a, h)]) for h, a in enumerate(anchors)], dim=1)
        if store.anchor_heads:
            store.k_full = torch.stack([_take(store.k_full[:, n], order[(layer, h)])
                                        for n, h in enumerate(store.anchor_heads)], dim=1)
        if store.shared_heads:
            pos = (store.prox_idx[:, None, :] == old_of_new[:, :, None]).to(torch.int8).argmax(-1)  # (B, n)
            store.k_prox = torch.stack([_take(store.k_prox[:, n], pos) for n in range(len(store.shared_heads))], dim=1)
        store.prox_idx = new_idx
        store.seen = T_new
    cache.dropped += T - T_new
    cache.reset_step_state()


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), idx (B, n) -> (B, n, D)."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
