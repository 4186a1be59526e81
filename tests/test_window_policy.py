"""Window-only pairs (plan policy "window", issue 21): sinks + recent window, no distant K or V.

The oracle is the reference with the window heads' distant positions masked. Every fast path (one-shot
prefill, chunked prefill, decode, scores-mode block pass, left padding, crop) must equal it, and a PodCache
must hold exactly what ``plan.kv_elements`` says: the window pairs' distant values are really gone.
"""

import json
import random

import pytest
import torch

from podkv import PodCache, SharingPlan, disable_pod, enable_pod
from podkv.attention.reference import pod_attention_reference
from podkv.cache.memory import pod_kv_bytes
from podkv.compat import cache_kwargs
from podkv.errors import PodError
from test_block_pass import _fed, _reference
from test_core_model import ids_for
from tiny import ARCHS, tiny_model
from tolerances import assert_close


def window_plan(layers=4, heads=2, ns=3, nr=6, seed=0, mode="keys", share=0.4, window=0.3) -> SharingPlan:
    """Random consecutive blocks; a block of one layer that no later layer reads may become window-only."""
    rng = random.Random(seed)
    anchors = [[0] * heads]
    for layer in range(1, layers):
        anchors.append([anchors[-1][h] if rng.random() < share else layer for h in range(heads)])
    policies = []
    for l, row in enumerate(anchors):
        read = [l + 1 < layers and anchors[l + 1][h] == l for h in range(heads)]
        policies.append(["shared" if a != l else "window" if not read[h] and rng.random() < window else "anchor"
                         for h, a in enumerate(row)])
    policies[-1][0] = "window" if anchors[-1][0] == layers - 1 else policies[-1][0]
    return SharingPlan(anchors=anchors, ns=ns, nr=nr, mode=mode, policies=policies)


def test_plan_round_trip_and_old_json_unchanged(tmp_path):
    plan = window_plan(seed=3)
    assert plan.has_window and plan.window_heads(3)
    again = SharingPlan.load(plan.save(tmp_path / "p.json"))
    assert again == plan and again.window_heads(3) == plan.window_heads(3)
    plain = SharingPlan.uniform(4, 2, 2)
    assert "policies" not in json.loads(plain.save(tmp_path / "q.json").read_text())  # old plans keep their JSON
    all_named = SharingPlan(anchors=plain.anchors, policies=[[plain.policy(l, h) for h in range(2)] for l in range(4)])
    assert all_named.to_dict() == plain.to_dict()  # naming only anchor/shared is the same plan


@pytest.mark.parametrize("change,match", [
    (lambda p: p[0].__setitem__(0, "stream"), r"policies\[0\]\[0\]' = 'stream': not a policy"),
    (lambda p: p[1].__setitem__(0, "anchor"), r"policies\[1\]\[0\]' = 'anchor' but anchors\[1\]\[0\] = 0"),
    (lambda p: p[0].__setitem__(0, "window"), r"leaves layer 1's block without an anchor"),
    (lambda p: p[2].__setitem__(1, "shared"), r"a shared pair needs an earlier anchor"),
    (lambda p: p.pop(), r"'policies' must be a 4 x 2 grid"),
])
def test_bad_policies_are_one_line_errors(change, match):
    anchors = [[0, 0], [0, 1], [2, 2], [3, 2]]
    policies = [["anchor", "anchor"], ["shared", "anchor"], ["anchor", "anchor"], ["anchor", "shared"]]
    change(policies)
    with pytest.raises(PodError, match=match):
        SharingPlan(anchors=anchors, policies=policies)


def test_reference_window_head_is_sink_and_window_attention():
    """The oracle's window head equals plain attention restricted to sinks + the recent window."""
    g = torch.Generator().manual_seed(0)
    B, H, T, D, ns, nr = 2, 2, 20, 8, 2, 5
    q, k, v = (torch.randn(B, 2 * H, T, D, generator=g), torch.randn(B, H, T, D, generator=g),
               torch.randn(B, H, T, D, generator=g))
    out = pod_attention_reference(q, k, torch.randn(B, H, T, D, generator=g), v, ns=ns, nr=nr, scale=0.3,
                                  window_heads=[1])
    i = torch.arange(T)
    keep = (i[None] <= i[:, None]) & ((i[None] < ns) | (i[None] > i[:, None] - nr))
    s = (q[:, 2:] @ k[:, 1:2].transpose(-1, -2) * 0.3).masked_fill(~keep, float("-inf"))
    assert_close(out[:, 2:], s.softmax(-1) @ v[:, 1:2], what="window head vs sink+window attention")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["keys", "scores"])
def test_forward_without_cache_equals_reference(arch, mode):
    model = tiny_model(arch)
    plan = window_plan(seed=1, mode=mode)
    ids = ids_for(2, 40)
    with torch.no_grad():
        ref = _reference(model, plan, ids)
        enable_pod(model, plan)
        fast = model(ids).logits
        disable_pod(model)
    assert_close(fast, ref, what=f"{arch} {mode} window plan, full forward")


@pytest.mark.parametrize("mode", ["keys", "scores"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sizes", [(40,), (12, 5, 1), (1,)])
def test_cache_prefill_and_decode_equal_reference(mode, seed, sizes, monkeypatch):
    """One-shot and chunked prefill, then token-by-token decode (the decode fast path in keys mode, the
    block pass in scores mode) through a PodCache == the reference on the whole sequence."""
    from podkv.attention import interface

    fast_calls = []
    name = "pod_decode" if mode == "keys" else "pod_block_attention"
    real = getattr(interface, name)
    monkeypatch.setattr(interface, name, lambda *a, **k: fast_calls.append(1) or real(*a, **k))
    model = tiny_model("llama")
    plan = window_plan(seed=seed, mode=mode)
    ids = ids_for(2, 40, seed=seed)
    with torch.no_grad():
        ref = _reference(model, plan, ids)
        fast = _fed(model, plan, ids, sizes)
    assert_close(fast, ref, what=f"{mode} seed {seed} sizes {sizes}")
    assert fast_calls or sizes == (40,), f"the {name} fast path never ran"


@pytest.mark.parametrize("mode", ["keys", "scores"])
def test_left_padded_batch_equals_reference(mode):
    model = tiny_model("llama")
    plan = window_plan(seed=4, mode=mode)
    ids = ids_for(3, 36, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :9], mask[1, :2] = 0, 0
    with torch.no_grad():
        ref = _reference(model, plan, ids, mask)
        fast = _fed(model, plan, ids, (6, 4, 1), mask)
    real = mask.bool()
    assert_close(fast[real], ref[real], what=f"{mode} left-padded window plan")


def test_memory_measured_equals_formula_and_crop_is_exact():
    model = tiny_model("llama")
    plan = window_plan(seed=5)
    assert plan.has_window
    ids = ids_for(2, 30, seed=1)
    enable_pod(model, plan)
    with torch.no_grad():
        cache = PodCache(model.config, crop_margin=2)
        model(ids[:, :27], **cache_kwargs(cache))
        assert cache.kv_bytes() == pod_kv_bytes(model.config, plan, 27, batch=2, crop_margin=2)
        full = model(ids[:, 27:], **cache_kwargs(cache)).logits
        assert cache.kv_bytes() == pod_kv_bytes(model.config, plan, 30, batch=2, crop_margin=2)
        cache.crop(-3)  # back to 27 tokens, then the same 3 again
        again = model(ids[:, 27:], **cache_kwargs(cache)).logits
    disable_pod(model)
    assert_close(again, full, what="after crop")
    layer = next(l for l in cache.layers if l.window_heads)
    assert layer.v.shape[1] == 2 - len(layer.window_heads)  # no distant values for window heads
    assert layer.v_prox.shape[2] == plan.ns + plan.nr + 2


def test_window_saves_both_keys_and_values():
    plan = SharingPlan(anchors=[[0, 0], [1, 0]], ns=2, nr=6, policies=[["anchor", "anchor"], ["window", "shared"]])
    T = 1000
    kept = plan.kv_elements(T, head_dim=1)
    # pair (0,0) and (0,1): 2T keys + values each; (1,0) window: 8 + 8; (1,1) shared: 8 keys + T values
    assert kept == 4 * T + 16 + 8 + T
    assert plan.kv_saving(T) == pytest.approx(1 - kept / (8 * T))


def test_snapkv_compaction_refuses_window_plans():
    from podkv.cache.selection import compact

    model = tiny_model("llama")
    plan = window_plan(seed=5)
    enable_pod(model, plan)
    with torch.no_grad():
        cache = PodCache(model.config)
        model(ids_for(1, 30), **cache_kwargs(cache))
    disable_pod(model)
    with pytest.raises(PodError, match="window-only"):
        compact(cache, {(0, 0): torch.zeros(1, 2, dtype=torch.long)})


@pytest.mark.parametrize("mode", ["keys", "scores"])
def test_training_gradients_equal_reference(mode):
    """`podkv train` on a plan with window-only pairs: the grouped chunked path backpropagates like the oracle."""
    from tolerances import GRAD

    plan = window_plan(seed=2, mode=mode)
    ids = ids_for(2, 40, seed=6)
    grads = []
    for reference in (True, False):
        model = enable_pod(tiny_model("llama").train(), plan, reference=reference, **({} if reference else {"chunk": 16}))
        model.zero_grad()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=GRAD[0], atol=GRAD[1], msg=n)


def test_gate_skip_on_window_plans_asks_only_shared_heads():
    """Gate skipping never predicts for a window-only head (it has no anchor); tau > 1 equals plain PoD."""
    model = tiny_model("llama")
    plan = window_plan(seed=1)
    ids = ids_for(2, 40, seed=7)
    with torch.no_grad():
        plain = _fed(model, plan, ids, (30, 1))
        enable_pod(model, plan)
        model.pod_runtime.skip_tau = 1.5
        cache, outs = PodCache(model.config), []
        outs.append(model(ids[:, :30], **cache_kwargs(cache)).logits)
        outs += [model(ids[:, t:t + 1], **cache_kwargs(cache)).logits for t in range(30, 40)]
        skip = model.pod_runtime.skip
        disable_pod(model)
    assert_close(torch.cat(outs, dim=1), plain, what="tau 1.5 vs plain PoD, window plan")
    shared = sum(len(plan.shared_heads(l)) for l in range(4) if plan.shared_heads(l))
    assert skip.shared_passes == 10 * shared  # window-only heads are not counted as skippable passes
