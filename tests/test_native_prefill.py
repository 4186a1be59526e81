"""The compiled one-shot prefill (attention/native/pod_prefill.c) == the reference oracle, over shapes and plans."""

import pytest
import torch

import podkv.attention.chunked as chunked
import podkv.attention.prefill as prefill
from podkv.attention import native
from podkv.attention.chunked import KeySources, pod_attention_chunked, pod_attention_groups
from podkv.attention.reference import pod_attention_reference
from tolerances import FLASH_F32, assert_close



@pytest.fixture(autouse=True)
def _kernel_built(native_kernel_dir):
    """Built inside the test session (into the suite's temporary folder), not at collection."""
    if not native.enabled():
        pytest.skip("no C compiler here: the native kernels do not build")

SETTINGS = [  # (ns, nr, T, Hq, Hkv, D): T around and across the kernel's 64-row blocks and 64-key tiles
    (16, 240, 1000, 9, 3, 64),  # smollm2's shape and window
    (4, 8, 40, 4, 2, 64),  # one block, a short window
    (16, 32, 130, 4, 1, 64),  # MQA, a partial last block
    (1, 1, 70, 2, 2, 64),  # only the query itself is recent
    (8, 200, 64, 4, 2, 64),  # window longer than the sequence: no distant tokens
    (16, 8, 10, 4, 2, 64),  # shorter than the sinks
    (0, 50, 300, 6, 2, 128),  # no sinks, head dim 128
    (3, 63, 257, 3, 1, 64),  # window and sinks off the tile grid
]


def _inputs(Hq, Hkv, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, q_anc = (torch.randn(1, Hq, T, D, generator=g) * 2 for _ in range(2))
    k_own, k_anc, v = (torch.randn(1, Hkv, T, D, generator=g) * 2 for _ in range(3))
    return q, q_anc, k_own, k_anc, v


def _taken(monkeypatch):
    calls = []
    real = native.pod_prefill
    monkeypatch.setattr(native, "pod_prefill", lambda *a: calls.append(a[1]) or real(*a))
    return calls


@pytest.mark.parametrize("ns,nr,T,Hq,Hkv,D", SETTINGS)
@pytest.mark.parametrize("scores_mode", [False, True])
@pytest.mark.parametrize("own", [(), (0,), "all"])
def test_native_prefill_equals_reference(monkeypatch, ns, nr, T, Hq, Hkv, D, scores_mode, own):
    """Shared heads, own-anchor heads (causal attention) and both mixed, in both modes, against the oracle."""
    own = tuple(range(Hkv)) if own == "all" else tuple(h for h in own if h < Hkv)
    q, q_anc, k_own, k_anc, v = _inputs(Hq, Hkv, T, D)
    G = Hq // Hkv
    sources = [(k_own, h) if h in own else (k_anc, h) for h in range(Hkv)]
    if scores_mode:
        for h in own:  # an own anchor's anchor query is its own
            q_anc[:, h * G:(h + 1) * G] = q[:, h * G:(h + 1) * G]
    anchor = torch.stack([t[:, j] for t, j in sources], dim=1)
    qa = q_anc if scores_mode else None
    ref = pod_attention_reference(q, k_own, anchor, v, ns=ns, nr=nr, scale=0.125, anchor_query=qa)
    calls = _taken(monkeypatch)
    src = KeySources(own_keys=k_own, own_start=0, values=v, anchor_keys=sources, own_anchor_heads=own)
    fast = pod_attention_chunked(q, 0, src, pad=torch.zeros(1, dtype=torch.long), ns=ns, nr=nr, scale=0.125,
                                 anchor_query=qa)
    assert calls == [Hkv]
    assert_close(fast, ref, what=f"native prefill ns={ns} nr={nr} T={T} own={own} scores={scores_mode}",
                 tol=FLASH_F32)


def test_native_prefill_with_window_only_heads_equals_reference(monkeypatch):
    """A window-only head (sinks + window, no distant key) next to shared heads: the kernel skips its distant
    tiles; the two groups' outputs together equal the oracle's window-head rows."""
    ns, nr, T, D = 4, 48, 333, 64
    q, q_anc, k_own, k_anc, v = _inputs(6, 3, T, D, seed=1)
    ref = pod_attention_reference(q, k_own, k_anc, v, ns=ns, nr=nr, scale=0.125, anchor_query=q_anc, window_heads=[1])
    calls = _taken(monkeypatch)
    shared = KeySources(own_keys=k_own[:, [0, 2]], own_start=0, values=v[:, [0, 2]],
                        anchor_keys=[(k_anc, 0), (k_anc, 2)])
    window = KeySources(own_keys=k_own[:, [1]], own_start=0, values=v[:, [1]], anchor_keys=[(k_anc, 1)],
                        proximal_only=True)
    fast = pod_attention_groups(q, 0, [([0, 2], shared), ([1], window)], pad=torch.zeros(1, dtype=torch.long),
                                ns=ns, nr=nr, scale=0.125, anchor_query=q_anc)
    assert sorted(calls) == [1, 2]
    assert_close(fast, ref, what="native prefill, window-only head", tol=FLASH_F32)


def test_native_prefill_equals_the_two_pass_path_and_dense_attention(monkeypatch):
    """The kernel against the PyTorch two-pass path on the same inputs, and with every head its own anchor
    against torch's causal attention (PoD with its own keys everywhere is dense attention)."""
    ns, nr, T, D = 16, 240, 700, 64
    q, q_anc, k_own, k_anc, v = _inputs(9, 3, T, D, seed=2)
    pad = torch.zeros(1, dtype=torch.long)
    src = KeySources(own_keys=k_own, own_start=0, values=v, anchor_keys=[(k_anc, h) for h in range(3)])
    fast = pod_attention_chunked(q, 0, src, pad=pad, ns=ns, nr=nr, scale=0.125, anchor_query=q_anc)
    monkeypatch.setattr(prefill, "NATIVE", False)
    slow = pod_attention_chunked(q, 0, src, pad=pad, ns=ns, nr=nr, scale=0.125, anchor_query=q_anc)
    assert_close(fast, slow, what="native vs two-pass prefill", tol=FLASH_F32)
    monkeypatch.setattr(prefill, "NATIVE", True)
    own = KeySources(own_keys=k_own, own_start=0, values=v, anchor_keys=[(k_own, h) for h in range(3)],
                     own_anchor_heads=(0, 1, 2))
    causal = torch.nn.functional.scaled_dot_product_attention(q, k_own, v, is_causal=True, scale=0.125,
                                                              enable_gqa=True)
    assert_close(pod_attention_chunked(q, 0, own, pad=pad, ns=ns, nr=nr, scale=0.125, anchor_query=q), causal,
                 what="native prefill, every head its own anchor, vs causal SDPA", tol=FLASH_F32)


@pytest.mark.parametrize("case", ["batch 2", "float64", "head dim 16", "strided last dim", "switched off"])
def test_native_prefill_declines_what_it_does_not_take(monkeypatch, case):
    """Batches, other dtypes, head dims off 64, a strided last dim, or NATIVE off: the two-pass path runs
    (and still equals the oracle)."""
    B, D, dtype = (2 if case == "batch 2" else 1), (16 if case == "head dim 16" else 64), torch.float32
    g = torch.Generator().manual_seed(3)
    q, q_anc = (torch.randn(B, 4, 90, D, generator=g) for _ in range(2))
    k_own, k_anc, v = (torch.randn(B, 2, 90, D, generator=g) for _ in range(3))
    if case == "float64":
        q, q_anc, k_own, k_anc, v = (x.double() for x in (q, q_anc, k_own, k_anc, v))
    if case == "strided last dim":
        k_own = torch.randn(B, 2, D, 90, generator=g).transpose(-1, -2)
    if case == "switched off":
        monkeypatch.setattr(prefill, "NATIVE", False)
    calls = _taken(monkeypatch)
    two_pass = []
    real = chunked.pod_prefill
    monkeypatch.setattr(chunked, "pod_prefill", lambda *a, **k: two_pass.append(1) or real(*a, **k))
    src = KeySources(own_keys=k_own, own_start=0, values=v, anchor_keys=[(k_anc, h) for h in range(2)])
    pad = torch.zeros(B, dtype=torch.long)
    fast = pod_attention_chunked(q, 0, src, pad=pad, ns=4, nr=20, scale=0.125, anchor_query=q_anc)
    assert calls == [] and two_pass == [1]
    ref = pod_attention_reference(q, k_own, k_anc, v, ns=4, nr=20, scale=0.125, anchor_query=q_anc, pad=pad)
    assert_close(fast.float(), ref.float(), what=f"declined: {case}")


@pytest.mark.parametrize("granularity", ["head", "layer", "window"])
def test_compiled_prefill_in_a_model_equals_reference(monkeypatch, granularity):
    """A tiny Llama with head dim 64 (the kernel's shape): a first prompt in one forward on the compiled prefill,
    then decode, == the oracle's logits; and == the same prompt fed in steps of nr (the block pass)."""
    from podkv import SharingPlan
    from test_block_pass import _fed, _reference
    from test_core_model import ids_for, random_plan
    from tiny import tiny_model

    model = tiny_model("llama", head_dim=64)
    plan = random_plan(4, 2, 4, 24, seed=5, mode="scores")
    if granularity == "layer":
        plan = SharingPlan.uniform(4, 2, 2, ns=4, nr=24, mode="scores")
    if granularity == "window":
        from test_window_policy import window_plan
        plan = window_plan(seed=1, mode="scores", ns=4, nr=24)
    calls = _taken(monkeypatch)
    ids = ids_for(1, 150, seed=4)
    with torch.no_grad():
        ref = _reference(model, plan, ids)
        whole = _fed(model, plan, ids, (140, 1))
        stepped = _fed(model, plan, ids, (24, 24, 24, 24, 24, 24, 1))
    assert sum(calls) == 4 * 2  # every KV head of every layer, once: the first prompt only
    assert_close(whole, ref, what=f"compiled one-shot prefill in a model ({granularity})", tol=FLASH_F32)
    assert_close(whole, stepped, what=f"compiled one-shot vs steps of nr ({granularity})", tol=FLASH_F32)
