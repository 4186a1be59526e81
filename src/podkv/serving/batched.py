"""PoD attention for a batch of decoding requests over paged caches (plain torch, no vLLM import).

Page layout (stage 2, only podkv reads and writes these pages): a layer's cache is ``num_blocks`` pages of
``block_size`` token rows, each row ``(H, C)``; :func:`token_rows` views it as one table of token rows,
so vLLM's slot number (``block * block_size + offset``) is a row index and a request's tokens are gathered
with one indexing op (:func:`token_index`).

vLLM hands an attention layer every request of a step at once; a decoding request brings one query
at position ``L - 1`` (``L`` = its tokens so far). For a shared layer (paper §2.2, mode "keys") that
query scores its *own* keys at proximal positions and its anchor layer's keys at the distant ones, with
its own values everywhere. The window is :func:`podkv.attention.reference.distant_span`'s (requests have
no padding): distant = ``[ns, L - nr)``, proximal = the sinks before it and the recent keys after it. So a
decode step is one attention call over ``K_eff``, the anchor's keys with the layer's own keys written at
the proximal positions (:func:`write_own_keys`).

Mode "scores" (:mod:`podkv.attention.block_pass` is the transformers twin): a shared layer scores its distant
keys with the *anchor's* query, so the distant softmax is the same for every layer of a block. The anchor
computes it once per step (:func:`distant_softmax`); each member layer weights its own values with it and
merges that with its proximal pass by log-sum-exp (:func:`scores_merge`, paper §2.2's gate). Decode rows
(:func:`scores_decode`) and one request's prefill chunk (:func:`chunk_rows`, :func:`chunk_masks`) share it.

The oracles are :func:`podkv.attention.chunked.pod_attention_chunked`, run one request at a time, and
:func:`podkv.attention.reference.pod_attention_reference` (tests/test_serving.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from podkv.attention.lse import attend_lse, merge_lse, to_bias
from podkv.attention.reference import allowed_mask, distant_span, proximal_mask


def token_rows(cache: torch.Tensor) -> torch.Tensor:
    """A layer's paged cache as vLLM allocates it, (num_blocks, H, block_size, C) contiguous, read as
    (num_blocks * block_size, H, C) token rows (a reinterpretation: only podkv uses these pages)."""
    if not cache.is_contiguous():
        raise RuntimeError("PoD stage-2 caches must be contiguous (one tensor per layer)")
    return cache.view(-1, cache.shape[1], cache.shape[-1])


def gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows (N, H, C), index (R, P) -> (R, P, H, C). ``index_select`` copies whole rows: about 4x faster on
    CPU than advanced indexing (``rows[index]``), which goes element-wise."""
    return torch.index_select(rows, 0, index.reshape(-1)).view(*index.shape, *rows.shape[1:])


def token_index(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Row of each token: block_table (R, max_blocks), positions (R, P) -> (R, P) row indices."""
    blocks = block_table.long().gather(1, positions // block_size)
    return blocks * block_size + positions % block_size


def decode_positions(seq_lens: torch.Tensor, length: int) -> torch.Tensor:
    """Positions 0..length-1 of every request, clamped to its own last token: (R,) -> (R, length)."""
    j = torch.arange(length, device=seq_lens.device)[None, :]
    return torch.minimum(j, seq_lens.long()[:, None] - 1)


def decode_window(ns: int, nr: int) -> tuple[int, int]:
    """(lo, back): the last query (at ``L - 1``) of a request of ``L`` tokens (no padding) has its distant keys
    at ``[lo, L - back)``, by :func:`~podkv.attention.reference.distant_span`, taken once for a query at -1
    (the span's end moves with the query, its start does not): the sinks are ``[0, lo)``, the recent window
    ``[L - back, L)``. Plain ints, taken once per step: the tensor ops per request stay those of ``L - nr``."""
    lo, hi = distant_span(0, -1, ns, nr)
    return lo, -hi


def all_proximal(seq_len, ns: int, nr: int):
    """Whether no query of a request of ``seq_len`` tokens (int, or a tensor of them) has a distant key: its
    last query's distant span is empty (``seq_len <= ns + nr``)."""
    lo, back = decode_window(ns, nr)
    return seq_len <= lo + back


def proximal_positions(seq_lens: torch.Tensor, ns: int, nr: int) -> torch.Tensor:
    """The sinks and the recent window of a query at ``L - 1`` (:func:`decode_window`), clamped into [0, L - 1]:
    (R,) -> (R, ns + nr).

    A clamped or repeated position names a key that is proximal anyway, so writing it twice is harmless.
    """
    lo, back = decode_window(ns, nr)
    L = seq_lens.long()[:, None]
    pos = torch.cat([torch.arange(lo, device=L.device)[None, :].expand(L.shape[0], -1),
                     L - back + torch.arange(back, device=L.device)[None, :]], dim=1)
    return torch.minimum(pos.clamp_min(0), L - 1)


def proximal_unique(seq_lens: torch.Tensor, ns: int, nr: int) -> torch.Tensor:
    """Which entries of :func:`proximal_positions` name a key for the first time: (R,) -> (R, ns + nr) bool.

    A pass over the gathered proximal keys (scores mode) must count each key once, unlike K_eff, where a
    repeated write is harmless: sinks past ``L - 1`` and window slots that fall on a sink are dropped."""
    lo, back = decode_window(ns, nr)
    L = seq_lens.long()[:, None]
    return torch.cat([torch.arange(lo, device=L.device)[None, :] < L,
                      L - back + torch.arange(back, device=L.device)[None, :] >= lo], dim=1)


def distant_mask(seq_lens: torch.Tensor, length: int, ns: int, nr: int) -> torch.Tensor:
    """The distant keys ``[lo, L - back)`` of a query at ``L - 1`` (:func:`decode_window`) among positions
    0..length-1: (R,) -> (R, length) bool."""
    lo, back = decode_window(ns, nr)
    j = torch.arange(length, device=seq_lens.device)[None, :]
    return (j >= lo) & (j < seq_lens.long()[:, None] - back)


def flat_positions(positions: torch.Tensor, length: int) -> torch.Tensor:
    """positions (R, P) in requests of ``length`` rows -> (R * P,) rows of the flattened (R * length) batch."""
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
    return (rows * length + positions).reshape(-1)


def write_own_keys(keys: torch.Tensor, own_keys: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """K_eff in place: keys (R, T, H, D) contiguous (the anchor's) get own_keys (R, P, H, D) at the rows
    ``flat`` = :func:`flat_positions` of the proximal positions.

    Every shared layer of a block writes the same positions, so one copy of the anchor's keys serves them
    all, one after the other."""
    R, T, H, D = keys.shape
    keys.view(R * T, H, D).index_copy_(0, flat, own_keys.reshape(-1, H, D))
    return keys


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """query (R, Hq, D); keys, values (R, T, H, D) (unit stride in D); visible (R, T) bool -> (R, Hq, D).

    A KV head's ``Hq / H`` query heads act as its query rows (no causal mask: one position per request).
    """
    R, Hq, D = query.shape
    H = keys.shape[2]
    q = query.reshape(R, H, Hq // H, D)
    out = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=visible[:, None, None, :], scale=scale)
    return out.reshape(R, Hq, D)


def by_kv_head(query: torch.Tensor, H: int) -> torch.Tensor:
    """Decode rows: query (R, Hq, D) -> (R, H, G, D), a KV head's G query heads as its rows."""
    R, Hq, D = query.shape
    return query.reshape(R, H, Hq // H, D)


def chunk_rows(query: torch.Tensor, H: int) -> torch.Tensor:
    """One request's query chunk (Tq, Hq, D) -> (1, H, Tq * G, D), row ``t * G + g`` (:func:`chunk_masks`)."""
    Tq, Hq, D = query.shape
    return query.reshape(Tq, H, Hq // H, D).transpose(0, 1).reshape(1, H, -1, D)


def chunk_out(out: torch.Tensor, Tq: int) -> torch.Tensor:
    """:func:`chunk_rows` undone: (1, H, Tq * G, D) -> (Tq, Hq, D)."""
    _, H, M, D = out.shape
    return out[0].reshape(H, Tq, M // Tq, D).transpose(0, 1).reshape(Tq, -1, D)


def chunk_masks(seq_len: int, Tq: int, ns: int, nr: int, G: int, device=None):
    """A chunk of the last Tq of ``seq_len`` positions, rows as :func:`chunk_rows`: the positions that are
    proximal to some query (sinks, then the chunk's windows) (P,), which of them each row sees (1, 1, Tq * G, P),
    and each row's distant keys (1, 1, Tq * G, seq_len). The reference's own masks, so the window is its."""
    lo, back = decode_window(ns, nr)
    qi = torch.arange(seq_len - Tq, seq_len, device=device)
    pos = torch.cat([torch.arange(min(lo, seq_len), device=device),
                     torch.arange(max(lo, seq_len - Tq + 1 - back), seq_len, device=device)])
    pad = torch.zeros(1, dtype=torch.long, device=device)
    keys = torch.arange(seq_len, device=device)
    keep = allowed_mask(pos, qi, pad) & proximal_mask(pos, qi, pad, ns, nr)  # (1, Tq, P)
    distant = allowed_mask(keys, qi, pad) & ~proximal_mask(keys, qi, pad, ns, nr)  # (1, Tq, seq_len)
    return pos, keep.repeat_interleave(G, dim=1)[:, None], distant.repeat_interleave(G, dim=1)[:, None]


def distant_softmax(anchor_query: torch.Tensor, anchor_keys: torch.Tensor, distant: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's distant pass (scores mode), run once by its anchor: anchor_query (R, H, M, D) (M query rows per
    KV head: :func:`by_kv_head`, :func:`chunk_rows`), anchor_keys (R, H, T, D), distant bool broadcastable to
    (R, 1, M, T) -> probabilities (R, H, M, T) float32 (0 off the distant keys) and their log-sum-exp (R, H, M)
    (-inf: a row with no distant key). Only the values differ between the block's layers, so each member turns
    these into its distant output with one product (:func:`scores_merge`)."""
    s = torch.matmul(anchor_query.float(), anchor_keys.float().transpose(-1, -2)).mul_(scale)  # (R, H, M, T)
    s.masked_fill_(~distant, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return s.sub_(lse[..., None]).exp_().nan_to_num_(0.0), lse


def scores_merge(query: torch.Tensor, own_keys: torch.Tensor, own_values: torch.Tensor, keep: torch.Tensor,
                 values: torch.Tensor, distant: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """A layer's PoD attention in scores mode: query (R, H, M, D); own_keys, own_values (R, H, P, D) at proximal
    positions, ``keep`` bool broadcastable to (R, 1, M, P); values (R, H, T, D); ``distant`` its block's
    :func:`distant_softmax` -> (R, H, M, D) float32.

    The proximal pass (own query, own keys) and the distant one (anchor's probabilities, own values) are two
    passes over disjoint keys of one softmax, merged exactly by log-sum-exp."""
    o_p, lse_p = attend_lse(query, own_keys, own_values, scale, bias=to_bias(keep))
    probs, lse_d = distant
    return merge_lse(o_p, lse_p, torch.matmul(probs, values.float()), lse_d)[0]


def scores_decode(query: torch.Tensor, own_keys: torch.Tensor, own_values: torch.Tensor, keep: torch.Tensor,
                  values: torch.Tensor, distant: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """:func:`scores_merge` for decode rows: query (R, Hq, D); own_keys, own_values (R, P, H, D) at the proximal
    positions, ``keep`` (R, P) (:func:`proximal_unique`); values (R, T, H, D) -> (R, Hq, D)."""
    out = scores_merge(by_kv_head(query, own_keys.shape[2]), own_keys.transpose(1, 2), own_values.transpose(1, 2),
                       keep[:, None, None, :], values.transpose(1, 2), distant, scale)
    return out.reshape(query.shape).to(query.dtype)


def scores_chunk(query: torch.Tensor, own_keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
                 keep: torch.Tensor, distant: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """:func:`scores_merge` for one request's query chunk: query (Tq, Hq, D); own_keys (P, H, D) at ``pos`` and
    ``keep`` from :func:`chunk_masks`; values (L, H, D) -> (Tq, Hq, D)."""
    v = values.transpose(0, 1)[None]  # (1, H, L, D)
    out = scores_merge(chunk_rows(query, own_keys.shape[1]), own_keys.transpose(0, 1)[None], v[:, :, pos], keep, v,
                       distant, scale)
    return chunk_out(out, query.shape[0]).to(query.dtype)


def causal_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One request's query chunk at the last Tq of L positions: query (Tq, Hq, D); keys, values (L, H, D)
    -> (Tq, Hq, D). PoD equals this when no query of the chunk has a distant key (:func:`all_proximal`)."""
    Tq, L = query.shape[0], keys.shape[0]
    visible = torch.ones(Tq, L, dtype=torch.bool, device=query.device).tril(L - Tq)
    out = F.scaled_dot_product_attention(query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                         attn_mask=visible, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def pod_decode(query, keys, values, seq_lens, *, scale: float, ns: int = 0, nr: int = 0, own_keys=None,
               anchor_query=None):
    """Reference-shaped entry for tests: query (R, Hq, D); keys (anchor's) and values (R, T, H, D); own_keys
    None (an anchor: plain causal attention) or the layer's own keys (R, T, H, D) -> (R, Hq, D).
    ``anchor_query`` (R, Hq, D): scores mode (the anchor's distant pass, then this layer's merge)."""
    T = keys.shape[1]
    visible = torch.arange(T, device=keys.device)[None, :] < seq_lens.long()[:, None]
    if own_keys is None:
        return decode_attention(query, keys, values, visible, scale)
    pos = proximal_positions(seq_lens, ns, nr)
    rows = torch.arange(keys.shape[0], device=keys.device)[:, None]
    if anchor_query is not None:
        distant = distant_softmax(by_kv_head(anchor_query, keys.shape[2]), keys.transpose(1, 2),
                                  distant_mask(seq_lens, T, ns, nr)[:, None, None, :], scale)
        return scores_decode(query, own_keys[rows, pos], values[rows, pos], proximal_unique(seq_lens, ns, nr),
                             values, distant, scale)
    keys = write_own_keys(keys.clone(), own_keys[rows, pos], flat_positions(pos, T))
    return decode_attention(query, keys, values, visible, scale)
