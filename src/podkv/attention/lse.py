"""Attention passes that also return the log-sum-exp of their scores, and their exact merge.

Splitting one softmax over disjoint key sets into passes and merging them by log-sum-exp is exact
(it is the paper's gate, §2.2: g = ΣexpP / (ΣexpP + ΣexpD) = σ(lseP − lseD)). It lets PoD read
distant keys where they are stored — the anchor layer's cache — instead of copying them next to the
proximal keys, which is what made the single-SDPA path slower than dense.
"""

from __future__ import annotations

import torch

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused(q: torch.Tensor) -> bool:
    """Whether :func:`attend_lse` runs the fused kernel for ``q`` (CPU): it never materialises the scores,
    so a caller may pass many rows at once; elsewhere the scores are built, so callers chunk the queries."""
    return q.device.type == "cpu" and _FLASH_CPU is not None


def attend_lse(q, k, v, scale: float, bias=None, causal: bool = False, every_row_sees_a_key: bool = False):
    """Softmax attention that also returns the log-sum-exp of the scores (float32).

    q (B, h, L, D), k/v (B, h, n, D) (views are fine; a strided last dim is copied), bias additive float, broadcastable
    to (B, h, L, n), or None; ``causal``: top-left causal mask (row r sees keys [0, r]), L == n
    -> out (B, h, L, D) float32, lse (B, h, L) float32 (-inf: no key seen).
    ``every_row_sees_a_key``: the caller knows no row of ``bias`` is all -inf, which skips the check for
    such rows (a full pass over the bias per call).
    On CPU: one fused flash-attention call, which returns the log-sum-exp; elsewhere the scores
    are materialised (callers keep L small: one query chunk).
    """
    if fused(q):
        # The kernel reads rows with unit stride: a view whose last dim is strided gives wrong results.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        b = None if bias is None else bias.to(q.dtype)
        o, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=b, scale=scale)
        lse = lse.float()
        if bias is not None and not every_row_sees_a_key:  # the kernel reports lse 0 (not -inf) for a row that sees no key
            lse = lse.masked_fill(torch.isneginf(bias).all(-1).expand(lse.shape), float("-inf"))
        return o.float(), lse
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.matmul(p, v.float()), lse


def merge_lse(out_a, lse_a, out_b, lse_b):
    """Outputs of two passes over disjoint keys -> the output of one softmax over both (and its lse).

    A pass that saw no key (lse -inf) contributes nothing; rows that saw no key at all give 0.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    w_b = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    return w_a * torch.nan_to_num(out_a) + w_b * torch.nan_to_num(out_b), lse


def merge_lse_finite(out_a, lse_a, out_b, lse_b):
    """:func:`merge_lse` for passes that each saw at least one key (finite lse): one fused lerp on
    the outputs instead of a dozen elementwise ops (prefill merges whole sequences)."""
    w_b = torch.sigmoid(lse_b - lse_a)  # share of the softmax mass in pass b
    return torch.lerp(out_a, out_b, w_b[..., None]), torch.logaddexp(lse_a, lse_b)


def to_bias(keep: torch.Tensor) -> torch.Tensor:
    """bool mask -> additive float bias (0 kept, -inf hidden), same shape."""
    return torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill(~keep, float("-inf"))
