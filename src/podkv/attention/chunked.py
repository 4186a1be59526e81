"""PoD attention, fast path: one SDPA call per query chunk over [proximal own keys | distant anchor keys].

Because the proximal and distant groups partition a query's visible positions, a single softmax
over the concatenated key list with a boolean mask is exactly the paper's gated sum (§2.2). Only a
chunk of queries at a time is scored, against just the keys it can see, so an 8K prefill never
allocates a T x T score matrix; decoding is one query against ns + nr + T keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from podkv.attention.heads import put_heads, select_heads
from podkv.attention.prefill import native_prefill, pod_prefill
from podkv.attention.reference import allowed_mask, proximal_mask

DEFAULT_CHUNK = 128  # benchmarks/RESULTS.md: 128 beat 512 on CPU (smaller masked score blocks)
OWN_ANCHORS_CAUSAL = True  # one-shot prefill: own-anchor heads in one causal call (off: two passes, for A/B runs)


@dataclass
class KeySources:
    """Where one layer's keys and values live, by cache index (B batch, H KV heads, D head dim).

    held_keys, held_values : (B, H, n, D) or None
        Proximal entries kept from earlier steps, at cache indices ``held_idx`` (B, n); -1 = empty.
    own_keys : (B, H, S, D)
        The layer's own keys for indices [own_start, T).
    values : (B, H, T, D)
        The layer's values for every index.
    anchor_keys : list of (tensor (B, *, T', D), head index in it), one per KV head
        Keys used for distant positions; T' >= the distant range that is read.
    proximal_only : bool
        Window-only heads (plan policy "window"): no distant position is attended (``anchor_keys`` unused).
    values_start : int
        Cache index of ``values``' first token (a window-only head's values exist only from the step on).
    own_anchor_heads : tuple of int
        Heads (positions in this source) that are their own anchor: their distant keys are their own keys and,
        in "scores" mode, their anchor query is their own query, so their PoD attention is causal attention.
        A one-shot prefill gives them one fused causal call instead of two passes and a merge.
    """

    own_keys: torch.Tensor
    own_start: int
    values: torch.Tensor
    anchor_keys: list[tuple[torch.Tensor, int]]
    held_keys: torch.Tensor | None = None
    held_values: torch.Tensor | None = None
    held_idx: torch.Tensor | None = None
    proximal_only: bool = False
    values_start: int = 0
    own_anchor_heads: tuple[int, ...] = ()


def pod_attention_groups(query: torch.Tensor, q_start: int, groups: list[tuple[list[int], KeySources]], *,
                         anchor_query: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """:func:`pod_attention_chunked` for KV heads grouped by what they read: ``groups`` is a list of (KV heads,
    their KeySources). Why: window-only heads attend to fewer positions than the others (a per-head mask), and
    their distant values do not exist; one call per group keeps every call's mask shared by its heads."""
    if len(groups) == 1:
        return pod_attention_chunked(query, q_start, groups[0][1], anchor_query=anchor_query, **kw)
    H = sum(len(heads) for heads, _ in groups)
    G = query.shape[1] // H
    out = torch.empty_like(query)
    for heads, src in groups:
        rows = [g for h in heads for g in range(h * G, (h + 1) * G)]  # the query heads of these KV heads
        qa = None if anchor_query is None or src.proximal_only else anchor_query[:, rows]
        out[:, rows] = pod_attention_chunked(query[:, rows], q_start, src, anchor_query=qa, **kw)
    return out


def pod_attention_chunked(
    query: torch.Tensor,
    q_start: int,
    src: KeySources,
    *,
    pad: torch.Tensor,
    ns: int,
    nr: int,
    scale: float,
    anchor_query: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    dropout: float = 0.0,
) -> torch.Tensor:
    """query (B, Hq, Tq, D) at cache indices [q_start, q_start+Tq) -> (B, Hq, Tq, D)."""
    Tq = query.shape[2]
    if _split_applies(query, src, pad, dropout):
        one_shot = q_start == 0 and src.own_keys.shape[2] == Tq  # queries = keys, from index 0
        if one_shot:  # the compiled kernel, where it applies
            out = native_prefill(query, src, anchor_query, ns=ns, nr=nr, scale=scale)
            if out is not None:
                return out
        if one_shot and _own_anchors_apply(src):
            return _prefill_own_anchors_causal(query, src, anchor_query, ns=ns, nr=nr, scale=scale, chunk=chunk)
        return pod_prefill(query, q_start, src, ns=ns, nr=nr, scale=scale, chunk=chunk, anchor_query=anchor_query)
    outs = []
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        q = query[:, :, c0:c1]
        qa = None if anchor_query is None else anchor_query[:, :, c0:c1]
        outs.append(_attend_chunk(q, qa, q_start + c0, q_start + c1, src, pad, ns, nr, scale, dropout))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _own_anchors_apply(src: KeySources) -> bool:
    """A one-shot prefill's heads include some that are their own anchor (and the shortcut is on)."""
    return OWN_ANCHORS_CAUSAL and bool(src.own_anchor_heads) and not src.proximal_only


def _prefill_own_anchors_causal(query, src: KeySources, anchor_query, *, scale: float, **kw) -> torch.Tensor:
    """A one-shot prefill whose heads are partly their own anchors: those heads take one fused causal call (PoD
    with every distant key its own is dense attention, exactly), the others the two-pass path. On CPU the two
    passes of an anchor head cost about 1.5x its causal call at 1K (two fused calls, a masked band, a merge:
    ``benchmarks/shipped/prefill_layer_1024.json``)."""
    B, Hq, T, D = query.shape
    H = src.values.shape[1]
    own = sorted(src.own_anchor_heads)
    rest = [h for h in range(H) if h not in src.own_anchor_heads]

    def rows(x, heads):  # the query rows of these KV heads, (B, len(heads) * G, T, D)
        return None if x is None else select_heads(x.reshape(B, H, Hq // H, T, D), heads).reshape(B, -1, T, D)

    def causal(heads):
        q = rows(query, heads)
        k, v = select_heads(src.own_keys, heads), select_heads(src.values[:, :, :T], heads)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

    if not rest:
        return causal(own)
    out = torch.empty(B, H, Hq // H, T, D, dtype=query.dtype, device=query.device)
    put_heads(out, own, causal(own).reshape(B, len(own), -1, T, D))
    sub = replace(src, own_keys=select_heads(src.own_keys, rest), values=select_heads(src.values, rest),
                  anchor_keys=[src.anchor_keys[h] for h in rest], own_anchor_heads=())
    shared = pod_prefill(rows(query, rest), 0, sub, scale=scale, anchor_query=rows(anchor_query, rest), **kw)
    put_heads(out, rest, shared.reshape(B, len(rest), -1, T, D))
    return out.reshape(B, Hq, T, D)


def _attend_chunk(q, q_anc, i0, i1, src: KeySources, pad, ns, nr, scale, dropout):
    device = q.device
    B = q.shape[0]
    # Own keys this chunk can need: possible sinks (index < max pad + ns) and the recent window.
    own_end = src.own_start + src.own_keys.shape[2]
    sink_end = min(i1, int(pad.max()) + ns)
    win_start = max(src.own_start, i0 - nr + 1)
    ranges = [(src.own_start, max(src.own_start, sink_end)), (win_start, i1)]
    ranges = _merge([(a, min(b, own_end)) for a, b in ranges if b > a])

    own_k = [src.own_keys[:, :, a - src.own_start:b - src.own_start] for a, b in ranges]
    own_v = [src.values[:, :, a - src.values_start:b - src.values_start] for a, b in ranges]
    own_idx = [torch.arange(a, b, device=device).expand(B, -1) for a, b in ranges]
    if src.held_keys is not None and src.held_idx.shape[1] > 0:
        own_k.insert(0, src.held_keys)
        own_v.insert(0, src.held_values)
        own_idx.insert(0, src.held_idx)
    own_idx = torch.cat(own_idx, dim=1)  # (B, n_own)

    # Distant range: positions >= ns of every row, and index <= i-nr for the chunk's last query.
    lo, hi = max(0, int(pad.min()) + ns), i1 - nr
    if src.proximal_only:
        hi = lo
    dist_idx = torch.arange(lo, max(lo, hi), device=device)
    qi = torch.arange(i0, i1, device=device)

    keep_own = allowed_mask(own_idx, qi, pad) & proximal_mask(own_idx, qi, pad, ns, nr)
    keep_dist = ((dist_idx[None, :] - pad[:, None]) >= ns)[:, None, :] & (dist_idx[None, None, :] <= (qi - nr)[None, :, None])
    mask = torch.cat([keep_own, keep_dist], dim=-1)[:, None]  # (B, 1, C, n_own + n_dist)

    keys = torch.cat(own_k + ([_gather_anchor(src.anchor_keys, lo, hi)] if hi > lo else []), dim=2)
    values = torch.cat(own_v + ([src.values[:, :, lo:hi]] if hi > lo else []), dim=2)
    if q_anc is not None:
        q, keys = _scores_mode_operands(q, q_anc, keys, n_own=own_idx.shape[1])
    if bool(mask.all()):
        mask = None  # typical decode step: every gathered key is visible; lets SDPA take its fastest kernel
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, dropout_p=dropout,
                                          enable_gqa=q.shape[1] != keys.shape[1])


def _split_applies(query, src: KeySources, pad, dropout) -> bool:
    """The two-pass path (prefill.py) covers inference over a whole unpadded sequence, in either mode.

    Training (autograd), padding and a prefill that continues a PodCache (own keys partly in the held
    proximal store) take the single-SDPA path: same math, fewer special cases.
    """
    return (dropout == 0.0 and not (torch.is_grad_enabled() and query.requires_grad)
            and src.own_start == 0 and src.values_start == 0 and (src.held_idx is None or src.held_idx.shape[1] == 0)
            and not bool(pad.any()))


def _gather_anchor(anchor_keys: list[tuple[torch.Tensor, int]], lo: int, hi: int) -> torch.Tensor:
    """Stack head h's distant keys [lo, hi) from its anchor layer -> (B, H, hi-lo, D)."""
    first = anchor_keys[0][0]
    same = all(t is first for t, _ in anchor_keys) and [i for _, i in anchor_keys] == list(range(len(anchor_keys)))
    if same and first.shape[1] == len(anchor_keys):
        return first[:, :, lo:hi]
    return torch.stack([t[:, i, lo:hi] for t, i in anchor_keys], dim=1)


def _scores_mode_operands(q, q_anc, keys, n_own):
    """Training-free "scores" variant: distant logits are the anchor's q·k. Concatenating along the
    head dim gives q'·k' = q·k_own on proximal keys and q_anc·k_anc on distant keys in one SDPA."""
    zeros = torch.zeros_like(keys)
    k_own = torch.cat([keys[:, :, :n_own], zeros[:, :, :n_own]], dim=-1)
    k_dist = torch.cat([zeros[:, :, n_own:], keys[:, :, n_own:]], dim=-1)
    return torch.cat([q, q_anc], dim=-1), torch.cat([k_own, k_dist], dim=2)


def _merge(ranges):
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
