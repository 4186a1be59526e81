"""``scores`` mode with one distant pass per block: fewer key reads and fewer scores than dense attention.

In ``scores`` mode every layer of a block scores its distant tokens with the *anchor's* query and the
anchor's keys, so the distant softmax — probabilities p and log-sum-exp lseD — is the same for the
whole block; only the values differ. When every distant token of the step's queries is already in
the cache with the values of every layer of the block, the anchor layer can do the block's distant
work at once (issue 19):

    p, lseD = softmax(q_a · K_a[lo:hi] / √d)          once per (block, KV head)
    oD_m    = p @ V_m[lo:hi]                          for every member layer m of the block

and each member layer m then runs only its proximal pass (sinks + window, own query, own keys) in one
softmax with its share of the block's distant pass, kept unnormalised (Σ e^(s−peak)·V_m and Σ e^(s−peak))
so the merge is a rescale — the same single softmax as the reference (paper §2.2, gate
g = σ(lseP − lseD); :mod:`podkv.attention.lse`).

When does the cache hold what the block needs? A query at cache index i reads distant tokens
[pad + ns, i − nr]. For a step of L queries [i0, i0 + L) that is at most index i0 + L − 1 − nr < i0
when L <= nr: tokens from earlier steps, whose values every layer already stored. So this path covers
decode (L = 1) and prefill fed in chunks of at most ``nr`` tokens (:mod:`podkv.models.chunked_forward`
does that). Anything else — a longer chunk, training — takes the general path of
:mod:`podkv.attention.chunked`, which recomputes the anchor scores in every layer.

Per step and KV head this reads the anchor's distant keys once per block instead of once per layer,
and computes their scores once per block: with the shipped plan (32 of 90 (layer, head) pairs are
anchors) about 0.68 of dense attention's key + value bytes.
"""

from __future__ import annotations

import torch

from podkv.attention.heads import head_runs
from podkv.attention.lse import to_bias
from podkv.attention.reference import allowed_mask, distant_span, proximal_mask


def block_pass_applies(cache, query: torch.Tensor, enabled: bool = True) -> bool:
    """Steps this module computes: ``scores`` mode, at most ``nr`` queries, no autograd."""
    plan = cache.plan
    return (enabled and plan.mode == "scores" and query.shape[2] <= plan.nr
            and not (torch.is_grad_enabled() and query.requires_grad))


def pod_block_attention(step, query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """query (B, Hq, L, D), key (B, H, L, D): this step's new tokens, just stored by ``PodCache.update``
    (``step``: its PodStep) -> (B, Hq, L, D). Runs the distant pass of the blocks this layer anchors (for all
    their layers), then this layer's proximal pass merged with its blocks' distant outputs."""
    cache, layer = step.cache, step.layer
    B, Hq, L, D = query.shape
    H = key.shape[1]
    G = Hq // H
    qg = query.reshape(B, H, G * L, D)  # the G query heads of a KV head act as G*L queries (rows g*L + l)
    i0, i1 = step.i0, step.i1
    stash = cache.per_step("block_distant", dict)  # member layer -> list of (h0, h1, out, peak, total)

    _anchor_distant(cache, layer, qg, i0, i1, G, scale, stash)
    out = _proximal_merged(step, qg, key, G, scale, stash.pop(layer, ()))
    return out.reshape(B, Hq, L, D).to(query.dtype)


def block_members(plan, layer: int, head: int) -> range:
    """Layers whose distant tokens of KV head ``head`` are scored by anchor ``layer``: its block."""
    end = layer + 1
    while end < plan.num_layers and plan.anchors[end][head] == layer:
        end += 1
    return range(layer, end)


def _anchor_distant(cache, layer, qg, i0, i1, G, scale, stash) -> None:
    """Distant pass of every block anchored at ``layer``: one softmax, one value product per member."""
    plan, store = cache.plan, cache.layers[layer]
    lo, hi = distant_span(cache.pad_min, i1 - 1, plan.ns, plan.nr)
    heads = store.anchor_heads
    if hi <= lo or not heads:
        return  # no query of this step has a distant token
    members = [tuple(block_members(plan, layer, h)) for h in heads]
    bias, cols = _distant_bias(cache, i0, i1, lo, hi, G)
    q = qg * scale  # (B, H, G*L, D): scaling the few queries beats scaling the many scores
    for (p0, p1), (j0, j1) in head_runs(heads, list(range(len(heads))), members):
        h0, h1 = heads[p0], heads[p0] + p1 - p0
        for a, b in _slices(h0, h1, qg.shape[0] * qg.shape[2] * (hi - lo)):
            s = torch.matmul(q[:, a:b], store.k_full[:, j0 + a - h0:j0 + b - h0, lo:hi].transpose(-1, -2))
            if bias is not None:  # only the last `cols` columns are hidden from some rows
                s[..., s.shape[-1] - cols:] += bias
            # Unnormalised softmax in place (max, exp, sum: three passes over the scores). Each member gets
            # exp(s - peak) @ V_m with peak and total; it normalises once, after merging (_proximal_merged).
            peak = s.amax(dim=-1, keepdim=True).nan_to_num_(0.0, neginf=0.0)  # (B, h, G*L, 1); 0: row of -inf
            s.sub_(peak).exp_()
            total = _f32(s.sum(dim=-1, keepdim=True))  # (B, h, G*L, 1); 0: a row with no distant key
            peak = _f32(peak)
            for m in members[p0]:
                o = _f32(torch.matmul(s, cache.layers[m].values_of(a, b)[:, :, lo:hi]))  # (B, h, G*L, D), unnormalised
                stash.setdefault(m, []).append((a, b, o, peak, total))


def _slices(h0: int, h1: int, per_head: int, budget: int = 1 << 24):
    """Head ranges whose score matrix stays under ``budget`` elements (a prefill chunk of 240 queries
    against 8K tokens is 2M scores per head and batch row)."""
    step = max(1, budget // max(1, per_head))
    for a in range(h0, h1, step):
        yield a, min(h1, a + step)


def _proximal_merged(step, qg, key, G, scale, distant) -> torch.Tensor:
    """Own-key attention over the held sinks + window and this step's tokens, in one softmax with the
    distant parts of its blocks -> (B, H, G*L, D) float32.

    ``distant``: (h0, h1, o, peak, total) per head range, ``o = Σ exp(s − peak)·v`` over the distant keys
    and ``total = Σ exp(s − peak)``. With m = max(proximal max, peak) per row, the softmax over both
    key sets is (Σ_P e^(s−m)·v + e^(peak−m)·o) / (Σ_P e^(s−m) + e^(peak−m)·total): exact, and a dozen
    small ops fewer than an attention call plus a log-sum-exp merge (batch-1 decode pays per op).
    Every query sees itself (``allowed_mask``), so the proximal max is finite and the sum is >= 1.
    """
    cache, i0, i1 = step.cache, step.i0, step.i1
    held_k, held_v, held_idx = step.held()
    k_p = _f32(torch.cat([held_k, key], dim=2))  # (B, H, n + L, D): small
    v_p = _f32(torch.cat([held_v, step.values_new], dim=2))
    s = torch.matmul(_f32(qg), k_p.transpose(-1, -2)).mul_(scale)  # (B, H, G*L, n + L)
    bias = _proximal_bias(cache, held_idx, i0, i1, G)
    if bias is not None:
        s.add_(bias)
    m = s.amax(dim=-1, keepdim=True)
    if distant:
        o, peak, total = _all_heads(distant, s.shape[1])
        m = torch.maximum(m, peak)
    s.sub_(m).exp_()
    den = s.sum(dim=-1, keepdim=True)
    out = torch.matmul(s, v_p)
    if distant:
        w = (peak - m).exp_()
        out.addcmul_(w, o)
        den.addcmul_(w, total)
    return out.div_(den)


def _all_heads(distant, H: int):
    """The (h0, h1, o, peak, total) parts of a layer's distant pass, one per anchor head range, joined into
    (o, peak, total) over all H heads, so the merge runs once instead of once per range. Every (layer, KV
    head) has one anchor, except window-only heads: they get an empty distant part (o = 0, peak = −inf,
    total = 0), which the merge weighs by e^(−inf) = 0."""
    parts = sorted(distant, key=lambda part: part[0])
    filled, h = [], 0
    for part in parts + [(H, H, None, None, None)]:
        if part[0] > h:  # window-only heads [h, part[0])
            o, peak = parts[0][2], parts[0][3]
            n = part[0] - h
            filled.append((h, part[0], o.new_zeros(o.shape[0], n, *o.shape[2:]),
                           peak.new_full((peak.shape[0], n, *peak.shape[2:]), float("-inf")),
                           peak.new_zeros(peak.shape[0], n, *peak.shape[2:])))
        if part[2] is not None:
            filled.append(part)
        h = part[1]
    if len(filled) == 1:
        return filled[0][2:]
    return tuple(torch.cat([p[k] for p in filled], dim=1) for k in (2, 3, 4))


def _f32(x: torch.Tensor) -> torch.Tensor:
    """``x.float()`` without a dispatch when it already is (decode pays per op)."""
    return x if x.dtype == torch.float32 else x.float()


def _proximal_bias(cache, held_idx, i0, i1, G):
    """(B, 1, G*L, n+L) bias: held slots and new tokens that are real, causal and proximal, per query."""
    def build():
        B = held_idx.shape[0]
        idx = torch.cat([held_idx, torch.arange(i0, i1, device=held_idx.device).expand(B, -1)], dim=1)
        qi = torch.arange(i0, i1, device=idx.device)
        pad, plan = cache.pad, cache.plan
        keep = allowed_mask(idx, qi, pad) & proximal_mask(idx, qi, pad, plan.ns, plan.nr)  # (B, L, n+L)
        return None if bool(keep.all()) else to_bias(keep).repeat(1, G, 1)[:, None]
    return cache.per_step("block_proximal_bias", build)


def _distant_bias(cache, i0, i1, lo, hi, G):
    """Bias of the distant pass over its last ``cols`` keys, (B, 1, G*L, cols), and ``cols``; (None, 0) when
    every query sees every key in [lo, hi). Rows hide their padding and sinks (rows padded differently),
    and in a chunk the query at i sees distant keys up to i − nr only: the last L − 1 columns."""
    def build():
        pad, plan = cache.pad, cache.plan
        start = lo if not cache.pad_uniform else max(lo, i0 - plan.nr + 1)
        if start >= hi:
            return None, 0
        d = torch.arange(start, hi, device=pad.device)
        qi = torch.arange(i0, i1, device=pad.device)
        keep = ~proximal_mask(d, qi, pad, plan.ns, plan.nr)  # distant = not a sink, not recent (and so not padding)
        return to_bias(keep).repeat(1, G, 1)[:, None], hi - start
    return cache.per_step("block_distant_bias", build)
