"""PoD attention in plain PyTorch, every score materialised: the test oracle.

Paper §2.2: for a query at position p, proximal keys are the first ``ns`` positions and the
``nr`` most recent ones (p-nr, p]; they are scored with the layer's own keys. All other earlier
positions are distant and scored with the block anchor's keys. One softmax over both groups
(equivalently the gate g = Σexp(aP) / (Σexp(aP)+Σexp(aD))); values are always the layer's own.
"""

from __future__ import annotations

import torch


def proximal_mask(key_idx: torch.Tensor, query_idx: torch.Tensor, pad: torch.Tensor, ns: int, nr: int) -> torch.Tensor:
    """Which keys are proximal for which query, by cache index.

    key_idx (B, K) or (K,), query_idx (Q,), pad (B,) left-padding counts -> (B, Q, K) bool.
    Position of a key in its sequence is ``key_idx - pad``; sinks are positions < ns.
    """
    key_idx = key_idx.expand(pad.shape[0], -1) if key_idx.dim() == 1 else key_idx
    is_sink = (key_idx - pad[:, None]) < ns  # (B, K)
    is_recent = key_idx[:, None, :] > (query_idx[None, :, None] - nr)  # (B, Q, K)
    return is_sink[:, None, :] | is_recent


def distant_span(first_real: int, last_query: int, ns: int, nr: int) -> tuple[int, int]:
    """Cache indices [lo, hi) that can be distant for queries up to ``last_query``: after the sinks of the
    row whose text starts at ``first_real`` (its padding), and at most ``last_query − nr``. The same
    window as :func:`proximal_mask`, as bounds: every fast path slices its distant keys with it."""
    return first_real + ns, last_query + 1 - nr


def allowed_mask(key_idx: torch.Tensor, query_idx: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Causal and not padding -> (B, Q, K) bool. A query always sees itself, so that rows of
    padding queries stay finite (their outputs are never read)."""
    key_idx = key_idx.expand(pad.shape[0], -1) if key_idx.dim() == 1 else key_idx
    causal = key_idx[:, None, :] <= query_idx[None, :, None]
    valid = key_idx >= pad[:, None]
    itself = key_idx[:, None, :] == query_idx[None, :, None]
    return (causal & valid[:, None, :]) | itself


def pod_attention_reference(
    query: torch.Tensor,
    own_keys: torch.Tensor,
    anchor_keys: torch.Tensor,
    values: torch.Tensor,
    *,
    ns: int,
    nr: int,
    scale: float,
    pad: torch.Tensor | None = None,
    anchor_query: torch.Tensor | None = None,
    window_heads: list[int] | tuple[int, ...] = (),
) -> torch.Tensor:
    """Reference PoD attention over a whole sequence, in float32.

    Parameters
    ----------
    query : (B, Hq, Tq, D)
        Queries of the last ``Tq`` positions of a ``T``-token sequence.
    own_keys, anchor_keys, values : (B, Hkv, T, D)
        ``anchor_keys[:, h]`` are the keys of head ``h``'s anchor layer (``own_keys[:, h]`` when
        the head is its own anchor). ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA).
    pad : (B,) or None
        Left-padding count of each row.
    anchor_query : (B, Hq, Tq, D) or None
        "scores" mode: distant logits are the anchor layer's ``anchor_query · anchor_keys``.
    window_heads : KV head indices
        Window-only heads (plan policy "window"): they attend to proximal tokens only.

    Returns
    -------
    (B, Hq, Tq, D) in the query's dtype.
    """
    B, Hq, Tq, _ = query.shape
    Hkv, T = own_keys.shape[1], own_keys.shape[2]
    group = Hq // Hkv
    k_own = own_keys.float().repeat_interleave(group, dim=1)  # (B, Hq, T, D)
    k_anc = anchor_keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    q = query.float()
    q_anc = q if anchor_query is None else anchor_query.float()

    s_own = q @ k_own.transpose(-1, -2) * scale  # (B, Hq, Tq, T)
    s_anc = q_anc @ k_anc.transpose(-1, -2) * scale
    pad = torch.zeros(B, dtype=torch.long, device=q.device) if pad is None else pad
    key_idx = torch.arange(T, device=q.device)
    query_idx = torch.arange(T - Tq, T, device=q.device)
    prox = proximal_mask(key_idx, query_idx, pad, ns, nr)[:, None]  # (B, 1, Tq, T)
    ok = allowed_mask(key_idx, query_idx, pad)[:, None]
    if window_heads:
        window = torch.zeros(Hkv, dtype=torch.bool, device=q.device)
        window[list(window_heads)] = True
        ok = ok & (prox | ~window.repeat_interleave(group)[None, :, None, None])  # (B, Hq, Tq, T)
    scores = torch.where(prox, s_own, s_anc).masked_fill(~ok, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v).to(query.dtype)
