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
[pad + ns, i − nr]. For a step of L queries [i0, i0 + L) those are tokens of earlier steps, whose values
every layer already stored, plus — when L > nr — the step's own tokens [i0, i0 + L − nr). The member
layers have not stored values for those yet when the anchor runs, so the anchor keeps its exp-scores
over them (L × (L − nr) per query head) and each member applies them to its own values when its turn
comes. That is exact too. A first unpadded prompt of up to 1K tokens is prefilled in one forward on the
two-pass path instead, longer ones and padded batches in steps of ``nr`` (:mod:`podkv.models.chunked_forward`):
steps longer than ``nr`` measured slower on CPU (docs/architecture.md); they serve callers that feed them.
Steps longer than ``STEP_LIMIT`` (memory grows with L²) and training take the general path of
:mod:`podkv.attention.chunked`, which recomputes the anchor scores in every layer.

Per step and KV head this reads the anchor's distant keys once per block instead of once per layer,
and computes their scores once per block: with the shipped plan (32 of 90 (layer, head) pairs are
anchors) about 0.68 of dense attention's key + value bytes.
"""

from __future__ import annotations

import ctypes
import math

import torch

from podkv.attention.heads import head_runs, select_heads, unstack
from podkv.attention.lse import to_bias
from podkv.attention.reference import allowed_mask, distant_span, proximal_mask


LOG2E = math.log2(math.e)
STEP_LIMIT = 1024  # longest step the block pass takes (tokens); longer ones take the general path


def block_pass_applies(cache, query: torch.Tensor, enabled: bool = True) -> bool:
    """Steps this module computes: ``scores`` mode, no autograd, at most ``max(nr, STEP_LIMIT)`` queries
    (a step's own distant scores wait for the block's later layers: memory grows with its square)."""
    plan = cache.plan
    return (enabled and plan.mode == "scores" and query.shape[2] <= max(plan.nr, STEP_LIMIT)
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
    stash = cache.per_step("block_distant", dict)  # member layer -> list of (h0, h1, out, peak, total, waiting)

    # Scores in base 2 (peaks too): e^(s − m) = 2^((s − m)·log2 e), and exp2 runs about 3x faster than exp on
    # this CPU, where the exps were 9% of a 4K prefill (benchmarks/shipped/profile_prefill_4096.md).
    scale2 = scale * LOG2E
    _anchor_distant(cache, layer, qg, i0, i1, G, scale2, stash)
    parts = stash.pop(layer, ())
    cells = None
    if parts is _JOINED:
        distant = _joined_part(cache, layer, G * L, D)
        cells = cache.per_step("block_joined", None)[0][layer]  # (H, rows, D + 2): the same cells, for the kernel
    else:
        distant = _all_heads(_own_values_applied(cache, layer, parts), H)
    out = _proximal_merged(step, qg, key, G, scale2, distant, cells)
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
    split = min(max(i0, lo), hi)  # distant tokens [lo, split) are from earlier steps, [split, hi) from this one
    q = qg * scale  # (B, H, G*L, D): scaling the few queries beats scaling the many scores
    if _split_keys_apply(cache, qg, lo, hi, bias, split):
        if NATIVE and _anchor_distant_native(cache, layer, q, lo, hi, members, stash):
            return None
        return _anchor_distant_split(cache, layer, q, lo, hi, members, stash)
    B, rows = qg.shape[0], qg.shape[2]
    for (p0, p1), (j0, j1) in head_runs(heads, list(range(len(heads))), members):
        h0, h1 = heads[p0], heads[p0] + p1 - p0
        for a, b, r0, r1 in _tiles(h0, h1, rows, B * (hi - lo)):
            s = torch.matmul(q[:, a:b, r0:r1], store.k_full[:, j0 + a - h0:j0 + b - h0, lo:hi].transpose(-1, -2))
            if bias is not None:  # only the last `cols` columns are hidden from some rows
                s[..., s.shape[-1] - cols:] += bias[:, :, r0:r1]
            # Unnormalised softmax in place (max, exp, sum: three passes over the scores). Each member gets
            # exp(s - peak) @ V_m with peak and total; it normalises once, after merging (_proximal_merged).
            peak = s.amax(dim=-1, keepdim=True).nan_to_num_(0.0, neginf=0.0)  # (B, h, r, 1); 0: row of -inf
            s.sub_(peak).exp2_()
            total = _f32(s.sum(dim=-1, keepdim=True))  # (B, h, r, 1); 0: a row with no distant key
            peak = _f32(peak)
            own = (s[..., split - lo:].clone(), split, hi) if split < hi and len(members[p0]) > 1 else None
            for m in members[p0]:
                if m == layer or own is None:  # every distant value of this step is in m's cache already
                    o, waiting = _f32(torch.matmul(s, cache.layers[m].values_of(a, b)[:, :, lo:hi])), None
                elif split == lo:  # all of them are the step's own: m stores their values when its turn comes
                    o, waiting = s.new_zeros(*s.shape[:-1], store.v.shape[-1], dtype=torch.float32), own
                else:
                    o = _f32(torch.matmul(s[..., :split - lo], cache.layers[m].values_of(a, b)[:, :, lo:split]))
                    waiting = own
                _stash(stash, m, a, b, r0, r1, rows, o, peak, total, waiting)


SPLIT = 4  # chunks of the distant keys in a batch-1 decode step (one bmm batch entry each)
SPLIT_MIN_KEYS = 256  # below this many distant keys a step is too small to gain from splitting


def _split_keys_apply(cache, qg, lo, hi, bias, split) -> bool:
    """Batch-1 decode: a (few rows × 4K keys) product of one head is a single matrix product, which the CPU
    runs on one thread at about half the memory bandwidth of two; cutting the keys into ``SPLIT`` chunks
    makes it a batch of ``SPLIT`` products that run in parallel (1.6x on 2 cores: docs/bench.md).
    Needs: plain tensors (not quantized), no mask inside the span, nothing of this step in it, and room
    below ``lo`` to start the chunks early (the extra columns, fewer than SPLIT, sinks or padding, are masked
    in the first chunk: so a chunk holds at least SPLIT keys)."""
    rows, n = qg.shape[2], hi - lo
    if qg.shape[0] != 1 or rows > 16 or bias is not None or split < hi or n < max(SPLIT_MIN_KEYS, SPLIT * SPLIT):
        return False
    v = cache.layers[0].v  # float32 storage only: the joined statistics are float32 and written in place
    return hi - SPLIT * -(-n // SPLIT) >= 0 and isinstance(v, torch.Tensor) and v.dtype == torch.float32


def _anchor_distant_split(cache, layer, q, lo, hi, members, stash) -> None:
    """:func:`_anchor_distant` of a batch-1 decode step, head by head, keys cut into ``SPLIT`` chunks of ``w``.

    The chunks cover [lo2, hi) with lo2 = hi − SPLIT·w <= lo; the ``lo − lo2`` columns before ``lo`` get −inf.
    Scores stay in the chunked layout (SPLIT, rows, w): the softmax statistics reduce over chunks and
    columns, and each member's ``exp(s − peak) @ V`` is a batch of SPLIT products summed. Results go to the
    step's joined buffer (:func:`_joined_cells`), which the member layers read whole. Batch-1 decode pays per
    operator, views included: every view here is taken once per (layer, head)."""
    store = cache.layers[layer]
    w = -(-(hi - lo) // SPLIT)
    lo2 = hi - SPLIT * w
    rows, D = q.shape[2], q.shape[3]
    cells, H = _joined_cells(cache, rows, D)
    q0, k0 = q[0], store.k_full[0]
    for j, (h, block) in enumerate(zip(store.anchor_heads, members)):
        k = k0[j, lo2:hi].view(SPLIT, w, D) if k0.stride(1) == D else k0[j, lo2:hi].reshape(SPLIT, w, D)
        s = torch.bmm(q0[h].expand(SPLIT, rows, D), k.transpose(1, 2))  # (SPLIT, rows, w)
        if lo2 < lo:
            s[0, :, :lo - lo2] = float("-inf")
        stats = cells[layer * H + h][:, D:]  # (rows, 2) [peak | total]: the anchor is its block's first member
        torch.amax(s, dim=(0, 2), out=stats[:, 0])  # finite: every row sees every key in [lo, hi)
        s.sub_(stats[:, :1]).exp2_()
        torch.sum(s, dim=(0, 2), out=stats[:, 1])
        for m in block:
            member = cache.layers[m]
            v = member.v[0, member.vrow[h], lo2:hi]
            y = torch.bmm(s, v.view(SPLIT, w, D) if v.stride(0) == D else v.reshape(SPLIT, w, D))  # (SPLIT, rows, D)
            cell = cells[m * H + h]
            torch.sum(y, dim=0, out=cell[:, :D])
            if m != layer:
                cell[:, D:].copy_(stats)
    for m in {m for block in members for m in block}:
        stash[m] = _JOINED


NATIVE = True  # batch-1 decode steps use the compiled kernels where they build (tests switch it off to compare)
NATIVE_PROXIMAL = True  # ... for the proximal pass and merge too (off: only the distant pass, for A/B runs)


def _anchor_distant_native(cache, layer, q, lo, hi, members, stash) -> bool:
    """:func:`_anchor_distant_split` in one call of the compiled kernel (:mod:`podkv.attention.native`) for every
    block this layer anchors: the same [o | peak | total] cells, each key and value row read once. False when
    the kernel is not built here or the tensors are not float32 rows it can read in place."""
    from podkv.attention import native

    store = cache.layers[layer]
    k0 = store.k_full[0]
    if not native.enabled() or q.dtype != torch.float32 or k0.dtype != torch.float32 or k0.stride(-1) != 1:
        return False
    rows, D = q.shape[2], q.shape[3]
    cells, H = _joined_cells(cache, rows, D)
    q0 = q[0].contiguous()
    pairs = []
    for j, (h, block) in enumerate(zip(store.anchor_heads, members)):
        outs = []
        for m in block:
            v = cache.layers[m].v[0]
            if v.stride(-1) != 1:
                return False
            row = cache.layers[m].vrow[h]
            outs.append((v.data_ptr() + 4 * (row * v.stride(0) + lo * v.stride(1)), v.stride(1),
                         cells[m * H + h].data_ptr()))
        pairs.append((q0[h].data_ptr(), k0.data_ptr() + 4 * (j * k0.stride(0) + lo * k0.stride(1)), k0.stride(1),
                      outs))
    if not native.block_decode(pairs, rows, D, hi - lo, cache.per_step("native_work", dict)):
        return False
    for m in {m for block in members for m in block}:
        stash[m] = _JOINED
    return True


_JOINED = "joined"  # stash mark: this member's distant part is its slice of the step's joined buffer


def _joined_cells(cache, rows, D):
    """The step's distant parts of every layer, one float32 buffer (layers, H, rows, D + 2) made once per step:
    [o | peak | total] per (layer, KV head), and its (rows, D + 2) cells, cell ``layer * H + head``.
    Window-only heads keep o = 0, peak = −inf, total = 0, which the merge weighs by e^(−inf) = 0."""
    def build():
        H = len(cache.layers[0].value_heads) + len(cache.layers[0].window_heads)
        buf = torch.zeros(len(cache.layers), H, rows, D + 2, dtype=torch.float32, device=cache.layers[0].v.device)
        buf[..., D].fill_(float("-inf"))
        return buf, buf.view(-1, rows, D + 2).unbind(0), H
    buf, cells, H = cache.per_step("block_joined", build)
    return cells, H


def _joined_part(cache, layer, rows, D):
    """Layer ``layer``'s (o, peak, total) of the joined buffer, (1, H, rows, ·) each."""
    buf = cache.per_step("block_joined", None)[0][layer:layer + 1]
    return buf[..., :D], buf[..., D:D + 1], buf[..., D + 1:]


def _own_values_applied(cache, layer, parts) -> list:
    """Finish the distant parts an anchor left for ``layer``: add ``exp(s − peak) @ V`` over the step's own
    distant tokens, whose values this layer has just stored -> (h0, h1, o, peak, total) per head range."""
    done = []
    for a, b, o, peak, total, waiting in parts:
        if waiting is not None:
            weights, split, hi = waiting
            o = o + torch.matmul(weights, cache.layers[layer].values_of(a, b)[:, :, split:hi]).float()
        done.append((a, b, o, peak, total))
    return done


TILE = 1 << 21  # scores per tile: 8 MB in float32, which the three softmax passes then read from cache


def _tiles(h0: int, h1: int, rows: int, per_row: int, budget: int | None = None):
    """(head range, row range) tiles of the score matrix under ``budget`` elements each. Why: the softmax
    passes are memory-bound, and a 240-query prefill chunk against 4K keys is 35 MB of scores for three
    heads: per-head tiles of at most 2M scores stay in the last-level cache (about 1.5x faster on this CPU);
    decode steps (a few rows) take all heads at once."""
    budget = budget or TILE
    per_head = max(1, rows * per_row)
    if per_head > budget:  # one head per tile, its rows split
        step = max(1, budget // max(1, per_row))
        for a in range(h0, h1):
            for r in range(0, rows, step):
                yield a, a + 1, r, min(rows, r + step)
        return
    step = max(1, budget // per_head)
    for a in range(h0, h1, step):
        yield a, min(h1, a + step), 0, rows


def _stash(stash, m, a, b, r0, r1, rows, o, peak, total, waiting) -> None:
    """File a tile's distant part for member layer ``m``: one entry per head range, its row tiles written into
    full-height tensors (decode and most tiles cover every row: no copy). ``waiting``: (weights, split, hi)
    over the step's own distant tokens, or None."""
    parts = stash.setdefault(m, [])
    if r0 == 0 and r1 == rows:
        parts.append((a, b, o, peak, total, waiting))
        return
    if r0 == 0:
        B, h, _, D = o.shape
        full = None if waiting is None else (waiting[0].new_empty(B, h, rows, waiting[0].shape[-1]), *waiting[1:])
        parts.append((a, b, o.new_empty(B, h, rows, D), peak.new_empty(B, h, rows, 1), total.new_empty(B, h, rows, 1),
                      full))
    _, _, O, P, S, W = parts[-1]
    O[:, :, r0:r1], P[:, :, r0:r1], S[:, :, r0:r1] = o, peak, total
    if W is not None:
        W[0][:, :, r0:r1] = waiting[0]


def _proximal_merged(step, qg, key, G, scale, distant, cells=None) -> torch.Tensor:
    """Own-key attention over the held sinks + window and this step's tokens, in one softmax with the
    distant parts of its blocks -> (B, H, G*L, D) float32.

    ``distant``: (o, peak, total) over all H heads (:func:`_all_heads`), or None; ``o = Σ exp(s − peak)·v`` over
    the distant keys and ``total = Σ exp(s − peak)``. With m = max(proximal max, peak) per row, the softmax over both
    key sets is (Σ_P e^(s−m)·v + e^(peak−m)·o) / (Σ_P e^(s−m) + e^(peak−m)·total): exact, and a dozen
    small ops fewer than an attention call plus a log-sum-exp merge (batch-1 decode pays per op).
    Every query sees itself (``allowed_mask``), so the proximal max is finite and the sum is >= 1.
    ``cells``: the layer's view of the step's joined distant buffer when ``distant`` comes from it; with it (or no
    distant part) a batch-1 step takes the compiled kernel, one call instead of a dozen operators.
    """
    cache, i0, i1 = step.cache, step.i0, step.i1
    if NATIVE and NATIVE_PROXIMAL and (cells is not None or not distant):
        out = _proximal_merged_native(step, qg, key, G, scale, cells)
        if out is not None:
            return out
    k_p, v_p, held_idx = _proximal_inputs(step, key)
    bias = _proximal_bias(cache, held_idx, i0, i1, G)
    k_p, v_p = _f32(k_p), _f32(v_p)  # (B, H, n + L, D): small
    s = torch.matmul(_f32(qg), k_p.transpose(-1, -2)).mul_(scale)  # (B, H, G*L, n + L)
    if bias is not None:
        s.add_(bias)
    m = s.amax(dim=-1, keepdim=True)
    if distant:
        o, peak, total = distant
        m = torch.maximum(m, peak)
    s.sub_(m).exp2_()
    den = s.sum(dim=-1, keepdim=True)
    out = torch.matmul(s, v_p)
    if distant:
        w = (peak - m).exp2_()
        out.addcmul_(w, o)
        den.addcmul_(w, total)
    return out.div_(den)


def _proximal_merged_native(step, qg, key, G, scale, cells):
    """:func:`_proximal_merged` of a batch-1 step in one call of the compiled kernel, which reads the held keys
    and values where the cache keeps them (the runs of :func:`_proximal_inputs`, without its two copies). None
    where it does not apply: batch > 1, window-only heads, quantized or non-float32 stores, kernel not built."""
    store, cache = step.store, step.cache
    if qg.shape[0] != 1 or store.window_heads or not isinstance(store.v, torch.Tensor):
        return None
    f32 = torch.float32
    v, k, ring = store.v[0], store.k_full, step.k_prox if store.ring_heads else None
    if qg.dtype != f32 or v.dtype != f32 or key.dtype != f32 or key.stride(-1) != 1 or v.stride(-1) != 1 \
            or (k is not None and (k.dtype != f32 or k.stride(-1) != 1)) \
            or (ring is not None and (ring.dtype != f32 or ring.stride(-1) != 1)):
        return None
    from podkv.attention import native

    if not native.enabled():
        return None
    runs, n, keep = cache.per_step("native_proximal", lambda: _native_runs(step, G))
    if runs is None or (ring is not None and ring.shape[2] != step.idx.shape[1]):
        return None
    # Per head: key pointer and row stride (an anchor head's keys are cache rows, like values; a shared head's
    # are its ring's held slots, then the step's), then value pointer and row stride (float32 elements).
    v_at, v_hs, v_rs = v.data_ptr(), 4 * v.stride(0), v.stride(1)
    if k is not None:
        k_at, k_hs, k_rs = k.data_ptr(), 4 * k.stride(1), k.stride(2)
    if ring is not None:
        r_at, r_hs, r_rs, held = ring.data_ptr(), 4 * ring.stride(1), ring.stride(2), ring.shape[2]
        key_at, key_hs, key_rs = key.data_ptr(), 4 * key.stride(1), key.stride(2)
    fields, vrow, anchors, rings = [], store.vrow, store.anchor_heads, store.ring_heads
    for h in range(key.shape[1]):
        if h in rings:
            fields += [r_at + rings.index(h) * r_hs, r_rs, key_at + h * key_hs, key_rs, held]
        else:
            fields += [k_at + anchors.index(h) * k_hs, k_rs, 0, 0, -1]
        fields += [v_at + vrow[h] * v_hs, v_rs]
    return native.proximal_merge(qg[0].contiguous(), runs, (ctypes.c_int64 * len(fields))(*fields), n, keep, cells,
                                 scale, cache.per_step("native_work", dict))


def _native_runs(step, G):
    """Per step: the cache rows the proximal pass reads (held slots, then the step's tokens) as a ctypes array of
    [a, b) pairs, their count n, and the keep mask (R, n) uint8 (None: every row sees every row)."""
    cache = step.cache
    runs = cache.slot_runs(step.idx)
    if runs is None:
        return None, 0, None
    runs = _with_step(runs, step)
    bias = _proximal_bias(cache, step.idx, step.i0, step.i1, G)
    keep = None if bias is None else (bias[0, 0] == 0).to(torch.uint8).contiguous()
    flat = [x for run in runs for x in run]
    return (ctypes.c_int64 * len(flat))(*flat), sum(b - a for a, b in runs), keep


def _proximal_inputs(step, key: torch.Tensor):
    """Keys and values of [held slots | the step's tokens] for every KV head, (B, H, n + L, D) each, and the held
    slot indices (B, n). Values and anchor keys are read where ``update`` just stored the step's tokens, so the
    slot runs simply extend over them: one copy each instead of a gather and a concatenation (batch-1 decode
    pays per op). Padded rows, window-only heads and quantized stores take :meth:`PodStep.held`."""
    store, runs = step.store, step.cache.slot_runs(step.idx)
    if runs is None or store.window_heads or not isinstance(store.v, torch.Tensor):
        held_k, held_v, idx = step.held()
        return torch.cat([held_k, key], dim=2), torch.cat([held_v, step.values_new], dim=2), idx
    runs = _with_step(runs, step)
    values = _take_runs(store.v, runs)
    if not store.anchor_heads:
        return torch.cat([step.k_prox, key], dim=2), values, step.idx
    keys = _take_runs(store.k_full, runs)
    if store.ring_heads:
        ring = torch.cat([step.k_prox, select_heads(key, store.ring_heads)], dim=2)
        keys = unstack((keys, ring), store.key_runs)  # [anchor | ring] -> head order
    return keys, values, step.idx


def _with_step(runs, step) -> list[tuple[int, int]]:
    """The held slots' runs of cache rows followed by the step's own rows [i0, i1) (joined when they touch)."""
    if runs and runs[-1][1] == step.i0:
        return runs[:-1] + [(runs[-1][0], step.i1)]
    return runs + [(step.i0, step.i1)]


def _take_runs(x: torch.Tensor, runs) -> torch.Tensor:
    parts = [x[:, :, a:b] for a, b in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _all_heads(distant, H: int):
    """The (h0, h1, o, peak, total) parts of a layer's distant pass, one per anchor head range, joined into
    (o, peak, total) over all H heads, so the merge runs once instead of once per range. Every (layer, KV
    head) has one anchor, except window-only heads: they get an empty distant part (o = 0, peak = −inf,
    total = 0), which the merge weighs by e^(−inf) = 0. None when the layer has no distant part this step."""
    if not distant:
        return None
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
