"""Fast chunked PoD attention == the materialised reference, over a matrix of shapes and plans."""

import pytest
import torch

from podkv.attention.chunked import KeySources, pod_attention_chunked
from podkv.attention.reference import pod_attention_reference
from tolerances import assert_close

SETTINGS = [  # (ns, nr, T, Hq, Hkv, chunk)
    (4, 8, 40, 4, 2, 16),
    (2, 16, 64, 6, 3, 7),
    (16, 32, 130, 4, 1, 64),  # MQA
    (1, 1, 20, 2, 2, 5),  # smallest window: only the query itself is recent
    (8, 200, 64, 4, 2, 32),  # window longer than the sequence: no distant tokens
]


def _inputs(B, Hq, Hkv, T, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g) * 2
    k_own, k_anc, v = (torch.randn(B, Hkv, T, D, generator=g) * 2 for _ in range(3))
    return q, k_own, k_anc, v


@pytest.mark.parametrize("ns,nr,T,Hq,Hkv,chunk", SETTINGS)
@pytest.mark.parametrize("scores_mode", [False, True])
def test_chunked_equals_reference(ns, nr, T, Hq, Hkv, chunk, scores_mode):
    q, k_own, k_anc, v = _inputs(2, Hq, Hkv, T)
    q_anc = torch.randn_like(q) if scores_mode else None
    pad = torch.tensor([0, 3])
    ref = pod_attention_reference(q, k_own, k_anc, v, ns=ns, nr=nr, scale=0.25, pad=pad, anchor_query=q_anc)
    src = KeySources(own_keys=k_own, own_start=0, values=v, anchor_keys=[(k_anc, h) for h in range(Hkv)])
    fast = pod_attention_chunked(q, 0, src, pad=pad, ns=ns, nr=nr, scale=0.25, anchor_query=q_anc, chunk=chunk)
    # Padding query rows are never read by the model; compare real rows only.
    assert_close(fast[1, :, 3:], ref[1, :, 3:], what="pad row")
    assert_close(fast[0], ref[0], what=f"ns={ns} nr={nr} T={T}")


def test_own_anchor_equals_dense_sdpa():
    q, k, _, v = _inputs(1, 4, 2, 50)
    ref = pod_attention_reference(q, k, k, v, ns=4, nr=8, scale=0.25)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    assert_close(ref, dense, what="identity plan vs SDPA")


def test_gate_form_equals_single_softmax():
    """Paper's gate g·oP + (1-g)·oD is the same as one softmax over both groups (§2.2)."""
    torch.manual_seed(0)
    a_p, a_d = torch.randn(5), torch.randn(9)
    v_p, v_d = torch.randn(5, 3), torch.randn(9, 3)
    g = a_p.exp().sum() / (a_p.exp().sum() + a_d.exp().sum())
    gated = g * (a_p.softmax(0) @ v_p) + (1 - g) * (a_d.softmax(0) @ v_d)
    joint = torch.cat([a_p, a_d]).softmax(0) @ torch.cat([v_p, v_d])
    assert_close(gated, joint, what="gate")


def test_prefill_never_scores_full_matrix(monkeypatch):
    """A long prefill is scored chunk by chunk: no SDPA call sees T x T scores."""
    import podkv.attention.chunked as chunked

    seen = []
    real = chunked.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q.shape[2] * k.shape[2])
        return real(q, k, v, **kw)

    monkeypatch.setattr(chunked.F, "scaled_dot_product_attention", spy)
    T = 2048
    q, k_own, k_anc, v = _inputs(1, 2, 1, T, D=8)
    src = KeySources(own_keys=k_own, own_start=0, values=v, anchor_keys=[(k_anc, 0)])
    pod_attention_chunked(q, 0, src, pad=torch.zeros(1, dtype=torch.long), ns=16, nr=64, scale=0.3, chunk=256)
    assert max(seen) <= 256 * (T + 256 + 16 + 64)
    assert max(seen) < T * T / 4
