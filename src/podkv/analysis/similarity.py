"""Inter-layer attention similarity: 1 - Jensen-Shannon divergence in bits (paper §2.1, observation 2)."""

from __future__ import annotations

import math

import torch


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits over the last dim (0·log 0 = 0)."""
    return -torch.special.xlogy(p, p).sum(-1) / math.log(2.0)


def js_similarity(p: torch.Tensor) -> torch.Tensor:
    """Mean over queries of 1 - JS_2(p_i, p_j) between every pair of layers.

    Parameters
    ----------
    p : torch.Tensor
        (L, Q, D) distributions over D distant positions, one per layer and query.

    Returns
    -------
    torch.Tensor
        (L, L) float64, symmetric, ones on the diagonal, values in [0, 1].
    """
    L = p.shape[0]
    h = entropy_bits(p)  # (L, Q)
    sim = torch.eye(L, dtype=torch.float64)
    for i in range(L - 1):
        m = 0.5 * (p[i:i + 1] + p[i + 1:])  # (L-i-1, Q, D)
        js = entropy_bits(m) - 0.5 * (h[i:i + 1] + h[i + 1:])  # JS = H(M) - (H(P)+H(Q))/2
        row = (1.0 - js.clamp(0.0, 1.0)).mean(-1).double()
        sim[i, i + 1:] = row
        sim[i + 1:, i] = row
    return sim


class SimilarityAccumulator:
    """Averages per-query-head (Hq, L, L) similarity over samples; KV heads average their query group."""

    def __init__(self, layers: int, q_heads: int, kv_heads: int):
        self.layers, self.q_heads, self.kv_heads = layers, q_heads, kv_heads
        self.total = torch.zeros(q_heads, layers, layers, dtype=torch.float64)
        self.count = 0

    def add(self, attn: dict[int, torch.Tensor]) -> None:
        """attn[layer] = (Hq, Q, D) distant distributions of one sample."""
        for head in range(self.q_heads):
            p = torch.stack([attn[layer][head] for layer in range(self.layers)])  # (L, Q, D)
            self.total[head] += js_similarity(p)
        self.count += 1

    def query_heads(self) -> torch.Tensor:
        """(Hq, L, L) mean similarity per query head."""
        return self.total / max(self.count, 1)

    def kv_heads_sim(self) -> torch.Tensor:
        """(Hkv, L, L): query heads h*g .. h*g+g-1 read KV head h (transformers' GQA layout)."""
        q = self.query_heads()
        group = self.q_heads // self.kv_heads
        return q.view(self.kv_heads, group, self.layers, self.layers).mean(1)
