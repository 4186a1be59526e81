"""Gate skipping during decode (paper §2.3): skip a shared head's distant pass when its gate is predictable.

PoD's output for one query is ``o = g·oP + (1−g)·oD`` with ``g`` the proximal share of the attention
mass. When ``g`` is close to 1 the distant pass (the O(T) part of a decode step) barely moves ``o``.
For a head that borrows distant keys from its block's anchor layer, the anchor has already attended
earlier in the same step, so its gate is known before this layer runs. If the predicted gate is
``>= tau``, the layer attends over its proximal keys only.

Predictors (``GateSkipState.predictor``):
  * ``"anchor_gate"``: ĝ = the anchor layer's own gate for the same KV head and query head;
  * ``"anchor_lse"``: ĝ = σ(lseP_own − lseD_anchor): this layer's proximal log-mass against the
    anchor's distant log-mass (uses the fresh proximal pass, so it tracks this layer's query better).

The decode step is computed as two passes merged by their logsumexp, which is exactly the single
softmax of the chunked path (up to float rounding): ``tau > 1`` never skips and equals PoD;
``tau = 0`` skips every shared head's distant pass (proximal-only attention in shared heads).
Anchor heads always attend in full. Only the ``"keys"`` mode with a :class:`PodCache` is covered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from podkv.attention.reference import allowed_mask, proximal_mask
from podkv.errors import PodError

PREDICTORS = ("anchor_gate", "anchor_lse")


@dataclass
class GateSkipState:
    """Counters and the anchor gates of the current decode step (one per model, in ``PodRuntime``)."""

    predictor: str = "anchor_gate"
    shared_passes: int = 0  # (layer, shared KV head, step) distant passes that could be skipped
    skipped_passes: int = 0  # ... that were skipped entirely (no distant keys read)
    anchor_passes: int = 0  # distant passes of anchor heads (never skipped)
    rows: int = 0  # (batch row, query head) decisions in shared heads
    rows_skipped: int = 0
    anchors: dict = field(default_factory=dict)  # (layer, head) -> (gate (B, G), distant lse (B, G))

    def __post_init__(self):
        if self.predictor not in PREDICTORS:
            raise PodError(f"gate-skip field 'predictor' must be one of {PREDICTORS}, got {self.predictor!r}")

    def reset(self) -> None:
        self.shared_passes = self.skipped_passes = self.anchor_passes = self.rows = self.rows_skipped = 0
        self.anchors.clear()

    def summary(self) -> dict:
        """Share of shared-head distant passes skipped, and of all distant passes (anchors included)."""
        total = self.shared_passes + self.anchor_passes
        return {"shared_passes": self.shared_passes, "skipped_passes": self.skipped_passes,
                "anchor_passes": self.anchor_passes,
                "skip_share_shared": self.skipped_passes / max(1, self.shared_passes),
                "skip_share_all": self.skipped_passes / max(1, total),
                "row_skip_share": self.rows_skipped / max(1, self.rows)}


def applies(runtime, cache, layer: int, query: torch.Tensor, anchor_query) -> bool:
    """Whether this attention call is a decode step that gate skipping handles."""
    return (runtime.skip_tau is not None and query.shape[2] == 1 and anchor_query is None
            and cache.layers[layer].seen_before > 0)


def decode_attention(cache, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float, runtime) -> torch.Tensor:
    """One decode step of PoD attention with gate skipping.

    query (B, Hq, 1, D), key (B, Hkv, 1, D) the new token's keys (after ``PodCache.update``)
    -> (B, Hq, 1, D). Commits the layer's proximal store like the chunked path does.
    """
    plan, store, state = cache.plan, cache.layers[layer], runtime.skip
    B, Hq, _, D = query.shape
    H = key.shape[1]
    G = Hq // H
    i = store.seen_before  # cache index of the query
    qg = query.reshape(B, H, G, D)  # the G query heads of a KV head act as G queries

    held_k, held_v, held_idx = store.held()
    k_p = torch.cat([held_k, key[:, :, -1:]], dim=2)  # (B, H, n+1, D)
    v_p = torch.cat([held_v, store.v[:, :, i:i + 1]], dim=2)
    idx_p = torch.cat([held_idx, held_idx.new_full((B, 1), i)], dim=1)  # (B, n+1)
    qi = torch.tensor([i], device=query.device)
    mask_p = (allowed_mask(idx_p, qi, cache.pad) & proximal_mask(idx_p, qi, cache.pad, plan.ns, plan.nr))[:, None]
    out_p, lse_p = _attend(qg, k_p, v_p, scale, mask_p)  # (B, H, G, D), (B, H, G)

    lo, hi = int(cache.pad.min()) + plan.ns, i + 1 - plan.nr
    if hi <= lo:  # every key is proximal: nothing to skip
        store.commit()
        return out_p.reshape(B, Hq, 1, D).to(query.dtype)
    skip = {}  # shared head -> (B, G) bool: predicted gate >= tau
    for h, anchor in enumerate(plan.anchors[layer]):
        if anchor == layer:
            state.anchor_passes += 1
            continue
        skip[h] = _predict(state, anchor, h, lse_p[:, h]) >= runtime.skip_tau
        state.shared_passes += 1
        state.rows, state.rows_skipped = state.rows + skip[h].numel(), state.rows_skipped + int(skip[h].sum())
    need = [h for h in range(H) if h not in skip or not bool(skip[h].all())]
    state.skipped_passes += H - len(need)
    if not need:
        store.commit()
        return out_p.reshape(B, Hq, 1, D).to(query.dtype)

    dist_idx = torch.arange(lo, hi, device=query.device)
    mask_d = None if bool((cache.pad == cache.pad[0]).all()) else \
        ((dist_idx[None] - cache.pad[:, None]) >= plan.ns)[:, None, None]  # (B, 1, 1, Td)
    out_d, lse_d = _distant(cache, layer, qg, need, lo, hi, scale, mask_d)  # (B, n, G, D), (B, n, G)
    out_d = torch.where(torch.isfinite(lse_d)[..., None], out_d, 0)  # a padded row may see no distant key
    lse_pn = lse_p[:, need]
    gate = torch.exp(lse_pn - torch.logaddexp(lse_pn, lse_d))  # paper §2.2: g = ΣexpP / (ΣexpP + ΣexpD)
    merged = gate[..., None] * out_p[:, need] + (1 - gate[..., None]) * out_d
    out = out_p.clone()
    for n, h in enumerate(need):
        if h in skip:
            out[:, h] = torch.where(skip[h][..., None], out_p[:, h], merged[:, n])
        else:
            out[:, h] = merged[:, n]
            state.anchors[(layer, h)] = (gate[:, n], lse_d[:, n])
    store.commit()
    return out.reshape(B, Hq, 1, D).to(query.dtype)


def _distant(cache, layer, qg, heads, lo, hi, scale, mask):
    """Distant pass of ``heads`` over cache indices [lo, hi), reading anchor keys and values in place.

    qg (B, H, G, D) -> out (B, len(heads), G, D), lse (B, len(heads), G). One call when every head
    reads one anchor tensor in head order (layer-granular plans), else one call per head.
    """
    store = cache.layers[layer]
    sources = [(store if a == layer else cache.layers[a]).anchor_source(h)
               for h, a in enumerate(cache.plan.anchors[layer])]
    first = sources[0][0]
    if len(heads) == len(sources) and all(t is first and j == h for h, (t, j) in enumerate(sources)) \
            and first.shape[1] == len(sources):
        return _attend(qg, first[:, :, lo:hi], store.v[:, :, lo:hi], scale, mask)
    parts = [_attend(qg[:, h:h + 1], sources[h][0][:, sources[h][1]:sources[h][1] + 1, lo:hi],
                     store.v[:, h:h + 1, lo:hi], scale, mask) for h in heads]
    return torch.cat([o for o, _ in parts], dim=1), torch.cat([s for _, s in parts], dim=1)


def _predict(state: GateSkipState, anchor: int, head: int, lse_p: torch.Tensor) -> torch.Tensor:
    """Predicted gate (B, G) of a shared head from its anchor's pass of this step; lse_p (B, G) own proximal."""
    known = state.anchors.get((anchor, head))
    if known is None:
        raise PodError(f"gate skipping found no gate of anchor layer {anchor} head {head} for this step; "
                       "the anchor must attend in the same decode step (use PodCache)")
    gate, lse_d = known
    if state.predictor == "anchor_gate":
        return gate
    return torch.sigmoid(lse_p - lse_d)


def _attend(q, k, v, scale, mask):
    """Softmax attention that also returns the logsumexp of the scores (float32).

    q (B, H, G, D), k/v (B, H, n, D) (strided views are fine), mask bool broadcastable to (B, H, G, n)
    or None -> (B, H, G, D), (B, H, G). On CPU this is one fused flash-attention call, which returns
    the logsumexp; elsewhere the scores are materialised (G x n per head is small in decode).
    """
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return out.float(), lse.float()
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.matmul(p, v.float()), lse


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
