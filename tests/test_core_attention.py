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
    (16, 8, 10, 4, 2, 4),  # shorter than the sinks
]


def _inputs(B, Hq, Hkv, T, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g) * 2
    k_own, k_anc, v = (torch.randn(B, Hkv, T, D, generator=g) * 2 for _ in range(3))
    return q, k_own, k_anc, v


@pytest.mark.parametrize("ns,nr,T,Hq,Hkv,chunk", SETTINGS)
@pytest.mark.parametrize("scores_mode,padded", [(False, True), (True, True), (False, False), (True, False)])
def test_chunked_equals_reference(ns, nr, T, Hq, Hkv, chunk, scores_mode, padded):
    """Padded inputs take the single-SDPA path; unpadded ones (either mode) the LSE-split path."""
    q, k_own, k_anc, v = _inputs(2, Hq, Hkv, T)
    q_anc = torch.randn_like(q) if scores_mode else None
    pad = torch.tensor([0, 3 if padded else 0])
    ref = pod_attention_reference(q, k_own, k_anc, v, ns=ns, nr=nr, scale=0.25, pad=pad, anchor_query=q_anc)
    src = KeySources(own_keys=k_own, own_start=0, values=v, anchor_keys=[(k_anc, h) for h in range(Hkv)])
    fast = pod_attention_chunked(q, 0, src, pad=pad, ns=ns, nr=nr, scale=0.25, anchor_query=q_anc, chunk=chunk)
    # Padding query rows are never read by the model; compare real rows only.
    assert_close(fast[1, :, int(pad[1]):], ref[1, :, int(pad[1]):], what="pad row")
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


@pytest.mark.parametrize("scores_mode", [False, True])
def test_split_path_mixed_anchors_equals_reference(scores_mode):
    """Heads reading different anchor tensors (and a non-identity head order) on the split path."""
    q, k_own, k_anc, v = _inputs(1, 6, 3, 90)
    q_anc = torch.randn_like(q) if scores_mode else None
    other = torch.randn_like(k_anc)
    sources = [(k_anc, 1), (k_anc, 2), (other, 0)]
    anchor = torch.stack([t[:, j] for t, j in sources], dim=1)
    ref = pod_attention_reference(q, k_own, anchor, v, ns=4, nr=10, scale=0.25, anchor_query=q_anc)
    src = KeySources(own_keys=k_own, own_start=0, values=v, anchor_keys=sources)
    fast = pod_attention_chunked(q, 0, src, pad=torch.zeros(1, dtype=torch.long), ns=4, nr=10, scale=0.25, chunk=16,
                                 anchor_query=q_anc)
    assert_close(fast, ref, what=f"mixed anchors, split path, scores={scores_mode}")


@pytest.mark.parametrize("scores_mode", [False, True])
@pytest.mark.parametrize("own", [(0, 1, 2), (0, 2), (1,)])
def test_own_anchor_heads_take_one_causal_call_and_equal_reference(monkeypatch, scores_mode, own):
    """Heads that are their own anchor (their distant keys and, in scores mode, their anchor query are their own)
    skip the two passes on a one-shot prefill: one causal call, the other heads two-pass, equal to the oracle."""
    import podkv.attention.chunked as chunked

    q, k_own, k_anc, v = _inputs(1, 6, 3, 70)
    q_anc = torch.randn_like(q) if scores_mode else None
    sources = [(k_own, h) if h in own else (k_anc, h) for h in range(3)]
    for h in own:
        if q_anc is not None:
            q_anc[:, 2 * h:2 * h + 2] = q[:, 2 * h:2 * h + 2]
    anchor = torch.stack([t[:, j] for t, j in sources], dim=1)
    ref = pod_attention_reference(q, k_own, anchor, v, ns=4, nr=10, scale=0.25, anchor_query=q_anc)
    two_pass = []
    real = chunked.pod_prefill
    monkeypatch.setattr(chunked, "pod_prefill", lambda q, *a, **k: two_pass.append(q.shape[1]) or real(q, *a, **k))
    src = KeySources(own_keys=k_own, own_start=0, values=v, anchor_keys=sources, own_anchor_heads=own)
    fast = pod_attention_chunked(q, 0, src, pad=torch.zeros(1, dtype=torch.long), ns=4, nr=10, scale=0.25, chunk=16,
                                 anchor_query=q_anc)
    assert_close(fast, ref, what=f"own anchors {own}, scores={scores_mode}")
    assert two_pass == ([] if len(own) == 3 else [2 * (3 - len(own))])  # only the shared heads' query rows


@pytest.mark.parametrize("padded", [False, True])
def test_prefill_never_scores_full_matrix(monkeypatch, padded):
    """Where the scores are materialised, a long prefill is scored chunk by chunk: no call sees T x T scores."""
    import podkv.attention.chunked as chunked
    import podkv.attention.prefill as prefill

    seen = []
    real_sdpa, real_lse = chunked.F.scaled_dot_product_attention, prefill.attend_lse

    def spy(q, k, v, **kw):
        seen.append(q.shape[2] * k.shape[2])
        return real_sdpa(q, k, v, **kw)

    def spy_lse(q, k, v, *a, **kw):  # queries arrive as G*C rows (G = 2 query heads per KV head here)
        seen.append(q.shape[2] // 2 * k.shape[2])
        return real_lse(q, k, v, *a, **kw)

    monkeypatch.setattr(chunked.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(prefill, "attend_lse", spy_lse)
    monkeypatch.setattr(prefill, "fused", lambda q: False)  # scores materialised (off CPU): rows go chunk by chunk
    T = 2048
    q, k_own, k_anc, v = _inputs(1, 2, 1, T, D=8)
    src = KeySources(own_keys=k_own, own_start=0, values=v, anchor_keys=[(k_anc, 0)])
    pad = torch.tensor([5 if padded else 0])
    pod_attention_chunked(q, 0, src, pad=pad, ns=16, nr=64, scale=0.3, chunk=256)
    assert max(seen) <= 256 * (T + 256 + 16 + 64)
    assert max(seen) < T * T / 4


def test_fused_prefill_takes_the_distant_rows_in_one_call(monkeypatch):
    """On CPU the distant pass is one fused causal call per head run (it never builds the scores): the same
    output as chunk by chunk, in fewer calls."""
    import podkv.attention.prefill as prefill

    calls = []
    real = prefill.attend_lse
    monkeypatch.setattr(prefill, "attend_lse", lambda *a, **kw: calls.append(kw.get("causal", False)) or real(*a, **kw))
    T, chunk = 600, 64
    q, k_own, k_anc, v = _inputs(1, 4, 2, T, D=8)
    q_anc = torch.randn_like(q)
    src = KeySources(own_keys=k_own, own_start=0, values=v, anchor_keys=[(k_anc, 0), (k_anc, 1)])
    pad = torch.zeros(1, dtype=torch.long)
    run = lambda: pod_attention_chunked(q, 0, src, pad=pad, ns=8, nr=40, scale=0.3, chunk=chunk, anchor_query=q_anc)
    one = run()
    assert calls.count(True) == 1  # one causal distant call for the one head run
    calls.clear()
    monkeypatch.setattr(prefill, "fused", lambda q: False)
    chunked_out = run()
    assert calls.count(True) == len(range(8 + 40, T, chunk))
    assert_close(one, chunked_out, what="distant rows in one call vs chunk by chunk")
    ref = pod_attention_reference(q, k_own, torch.stack([k_anc[:, 0], k_anc[:, 1]], dim=1), v, ns=8, nr=40, scale=0.3,
                                  anchor_query=q_anc)
    assert_close(one, ref, what="one-call distant pass vs reference")


def test_attend_lse_matches_softmax_and_marks_rows_without_keys():
    """The LSE passes behind decode/prefill: exact output and lse; a fully masked row has lse -inf
    (the CPU flash kernel itself reports 0 there, which would count as mass e^0 in a merge)."""
    from podkv.attention.lse import attend_lse, merge_lse, to_bias

    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 2, 3, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1] = False
    bias = to_bias(keep)[:, None, None]
    out, lse = attend_lse(q, k, v, 0.3, bias)
    s = q @ k.transpose(-1, -2) * 0.3
    assert_close(out[0], (s[0].softmax(-1) @ v[0]), what="lse pass output")
    assert_close(lse[0], torch.logsumexp(s[0], -1), what="lse")
    assert torch.isneginf(lse[1]).all()
    merged, _ = merge_lse(out, lse, torch.ones_like(out), torch.zeros_like(lse))
    assert_close(merged[1], torch.ones_like(merged[1]), what="empty pass contributes nothing")


def test_attend_lse_accepts_views_with_a_strided_last_dim():
    from podkv.attention.lse import attend_lse

    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 3, 8, generator=g)
    k_t = torch.randn(1, 2, 8, 5, generator=g)  # keys stored transposed: k_t.transpose(-1, -2) is strided
    v = torch.randn(1, 2, 5, 8, generator=g)
    out, _ = attend_lse(q, k_t.transpose(-1, -2), v, 0.3)
    ref = (q @ k_t * 0.3).softmax(-1) @ v
    assert_close(out, ref, what="strided keys")


def test_scores_mode_one_shot_takes_the_split_path(monkeypatch):
    """An unpadded "scores" prefill runs the two-pass path (fused causal kernel for the bulk), not one masked
    SDPA over [own | anchor] keys per chunk."""
    import podkv.attention.chunked as chunked

    calls = []
    real = chunked.pod_prefill
    monkeypatch.setattr(chunked, "pod_prefill", lambda *a, **k: calls.append(k["anchor_query"]) or real(*a, **k))
    q, k_own, k_anc, v = _inputs(1, 4, 2, 60)
    q_anc = torch.randn_like(q)
    src = KeySources(own_keys=k_own, own_start=0, values=v, anchor_keys=[(k_anc, h) for h in range(2)])
    pod_attention_chunked(q, 0, src, pad=torch.zeros(1, dtype=torch.long), ns=4, nr=8, scale=0.25, anchor_query=q_anc)
    assert len(calls) == 1 and calls[0] is q_anc
