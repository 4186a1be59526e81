"""PoD attention for many queries at once (prefill), as two passes merged by log-sum-exp.

For a query at index i the proximal keys are the sinks [0, ns) and the band (i−nr, i] (own keys);
the distant keys are [ns, i−nr] (anchor keys). Splitting the softmax by group (exact, see lse.py):

  * proximal pass, per query chunk: sinks + band of own keys, one short masked call;
  * distant pass, per head run that reads one anchor tensor: a *causal* attention shifted by nr —
    rows [a, b) see anchor keys [ns, a−nr) in full (a rectangle, read in place) and [a−nr, b−nr)
    under a top-left causal mask. No key is copied next to another, no T-long mask is built, and the
    bulk runs in the same fused kernel as dense causal attention. Where that kernel runs (CPU) it never
    builds the scores, so all rows go in one call per head run (a 1K prefill of smollm2-pod: 900 kernel calls
    → 300, 68K aten calls → 29K); elsewhere the scores are materialised, so rows go a query chunk at a time.

Used for inference over keys that start at index 0 without padding (what a one-shot prefill is), in both
modes: in "scores" mode the distant pass takes the anchor's query (its scores are then the anchor's own),
the proximal pass the layer's. :mod:`podkv.attention.chunked` covers the rest with one masked SDPA per chunk.
"""

from __future__ import annotations

import functools
import math

import torch

from podkv.attention.heads import head_runs
from podkv.attention.lse import attend_lse, fused, merge_lse_finite, to_bias


NATIVE = True  # a batch-1 float32 one-shot prefill takes the compiled kernel where it builds (off: for A/B runs)


def compiled_applies(batch: int, q_heads: int, kv_heads: int, head_dim: int, dtype, device) -> bool:
    """Whether the compiled prefill takes a layer of this shape and storage: batch 1, float32 on CPU, head dim a
    multiple of 64, at most 16 query heads per KV head, the kernel built and ``NATIVE`` on. One rule for the
    kernel's callers and for how chunked_forward feeds a prompt."""
    from podkv.attention import native

    return (NATIVE and batch == 1 and head_dim % 64 == 0 and q_heads // kv_heads <= 16 and dtype == torch.float32
            and torch.device(device).type == "cpu" and native.enabled())


def native_prefill(query, src, anchor_query, *, ns: int, nr: int, scale: float):
    """A one-shot prefill (queries = keys from index 0, batch 1, float32) in one call of the compiled kernel
    (native/pod_prefill.c): every KV head in one flash-style pass that scores each key once, with its own query
    (sinks, window; every key of an own-anchor head) or the distant one (distant keys), and skips the tiles a
    window-only head never reads. None where it does not apply; the two-pass path then runs.
    Why: the two passes score a masked third of the band for nothing and pay a merge and copies per head run
    (docs/bench.md); their fused calls cannot share a tile between the two queries."""
    B, Hq, T, D = query.shape
    H = src.values.shape[1]
    qd = query if anchor_query is None else anchor_query
    tensors = [query, qd, src.own_keys, src.values] + ([] if src.proximal_only else [t for t, _ in src.anchor_keys])
    if not compiled_applies(B, Hq, H, D, query.dtype, query.device) or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.stride(-1) == 1 and t.device.type == "cpu"
            for t in tensors):  # quantized stores (QuantTokens) and strided rows: the two-pass path
        return None
    from podkv.attention import native

    G, own = Hq // H, set(src.own_anchor_heads)
    fields = []
    for h in range(H):
        kind = 2 if src.proximal_only else 0 if h in own else 1
        q0, d0, k0, v0 = query[0, h * G], qd[0, h * G], src.own_keys[0, h], src.values[0, h]
        ka = k0 if kind != 1 else src.anchor_keys[h][0][0, src.anchor_keys[h][1]]
        fields += [kind, q0.data_ptr(), query.stride(1), query.stride(2), d0.data_ptr(), qd.stride(1), qd.stride(2),
                   k0.data_ptr(), src.own_keys.stride(2), ka.data_ptr(), ka.stride(0), v0.data_ptr(),
                   src.values.stride(2)]
    out = native.pod_prefill(fields, H, G, T, D, ns, nr, scale * math.log2(math.e))
    return None if out is None else out.to(query.dtype)


def pod_prefill(query, q_start: int, src, *, ns: int, nr: int, scale: float, chunk: int,
                anchor_query: torch.Tensor | None = None) -> torch.Tensor:
    """query (B, Hq, Tq, D) at indices [q_start, q_start+Tq); ``src`` a KeySources with own_start 0;
    ``anchor_query`` (like ``query``): "scores" mode, the queries that score distant keys."""
    B, Hq, Tq, D = query.shape
    H = src.values.shape[1]
    G = Hq // H
    T = q_start + Tq
    qg = query.reshape(B, H, G, Tq, D)
    qd = qg if anchor_query is None else anchor_query.reshape(B, H, G, Tq, D)
    out = torch.empty(B, H, G, Tq, D, dtype=torch.float32, device=query.device)
    lse = torch.empty(B, H, G, Tq, dtype=torch.float32, device=query.device)
    for c0 in range(0, Tq, chunk):  # proximal pass
        i0, i1 = q_start + c0, min(T, q_start + c0 + chunk)
        o, l = _proximal(qg[:, :, :, c0:c0 + i1 - i0], i0, i1, src, ns, nr, scale)
        out[:, :, :, c0:c0 + i1 - i0], lse[:, :, :, c0:c0 + i1 - i0] = o, l
    first = T if src.proximal_only else max(q_start, ns + nr)  # the first query with a distant key
    rows_per_call = T if fused(query) else chunk
    for a in range(first, T, rows_per_call):  # distant pass
        b = min(T, a + rows_per_call)
        rows = slice(a - q_start, b - q_start)
        for (h0, h1), (j0, _) in head_runs(list(range(H)), [j for _, j in src.anchor_keys],
                                           [id(t) for t, _ in src.anchor_keys]):
            t = src.anchor_keys[h0][0]
            o, l = _distant(qd[:, h0:h1, :, rows], a, b, t[:, j0:j0 + h1 - h0], src.values[:, h0:h1], ns, nr, scale)
            out[:, h0:h1, :, rows], lse[:, h0:h1, :, rows] = merge_lse_finite(out[:, h0:h1, :, rows], lse[:, h0:h1, :, rows], o, l)
    return out.reshape(B, Hq, Tq, D).to(query.dtype)


def _proximal(q, i0, i1, src, ns, nr, scale):
    """q (B, H, G, C, D) -> own-key attention over sinks [0, ns) and the band (i-nr, i]."""
    B, H, G, C, D = q.shape
    band = max(ns, i0 - nr + 1)
    sink_end = min(ns, i1)
    keys = torch.cat([src.own_keys[:, :, :sink_end], src.own_keys[:, :, band:i1]], dim=2)
    values = torch.cat([src.values[:, :, :sink_end], src.values[:, :, band:i1]], dim=2)
    # Past the first ns+nr-1 indices the mask only depends on the chunk length: built once, reused.
    i0_key = min(i0, ns + nr - 1)
    bias = _proximal_bias(i0_key, i0_key + C, ns, nr, G, str(q.device))
    # Every row sees its own key (in the band, or a sink), so no row needs the empty-row correction.
    o, l = attend_lse(q.reshape(B, H, G * C, D), keys, values, scale, bias, every_row_sees_a_key=True)
    return o.reshape(B, H, G, C, D), l.reshape(B, H, G, C)


@functools.lru_cache(maxsize=64)
def _proximal_bias(i0, i1, ns, nr, G, device):
    """(G*C, n) bias over [sinks | band] keys for queries [i0, i1) (G query heads stacked)."""
    band, sink_end = max(ns, i0 - nr + 1), min(ns, i1)
    qi = torch.arange(i0, i1, device=device)[:, None]
    sinks = torch.arange(sink_end, device=device)[None] <= qi
    recent = torch.arange(band, max(band, i1), device=device)[None]
    keep = torch.cat([sinks, (recent <= qi) & (recent > qi - nr)], dim=1)  # (C, n)
    return to_bias(keep).repeat(G, 1)


def _distant(q, a, b, anchor, values, ns, nr, scale):
    """q (B, h, G, C, D) for rows [a, b), a >= ns+nr -> attention over anchor keys [ns, i-nr] per row."""
    B, h, G, C, D = q.shape
    rect_end = a - nr  # rows all see [ns, a-nr); [a-nr, b-nr) is the causal part
    o, l = attend_lse(q.reshape(B, h, G * C, D), anchor[:, :, ns:rect_end], values[:, :, ns:rect_end], scale) \
        if rect_end > ns else (None, None)
    if o is not None:
        o, l = o.reshape(B, h, G, C, D), l.reshape(B, h, G, C)
    k_tri = anchor[:, :, rect_end:b - nr].repeat_interleave(G, dim=1)  # C keys: a small copy for GQA
    v_tri = values[:, :, rect_end:b - nr].repeat_interleave(G, dim=1)
    o_t, l_t = attend_lse(q.reshape(B, h * G, C, D), k_tri, v_tri, scale, causal=True)
    o_t, l_t = o_t.reshape(B, h, G, C, D), l_t.reshape(B, h, G, C)
    return (o_t, l_t) if o is None else merge_lse_finite(o, l, o_t, l_t)
