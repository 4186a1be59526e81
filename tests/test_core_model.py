"""PoD inside real transformers models: identity == dense, cache == reference, memory == formula, padding."""

import random

import pytest
import torch
from transformers import DynamicCache

from podkv import PodCache, PodError, SharingPlan, disable_pod, enable_pod
from podkv.cache.memory import dense_kv_bytes, pod_kv_bytes
from tiny import ARCHS, tiny_config, tiny_model
from tolerances import assert_close


def random_plan(layers, heads, ns, nr, seed, mode="keys"):
    rng = random.Random(seed)
    anchors = [[0] * heads]
    for layer in range(1, layers):
        anchors.append([layer if rng.random() < 0.4 else anchors[-1][h] for h in range(heads)])
    return SharingPlan(anchors=anchors, ns=ns, nr=nr, mode=mode)


def ids_for(batch, T, seed=0):
    return torch.randint(3, 128, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_plan_equals_dense(arch):
    model = tiny_model(arch)
    ids = ids_for(2, 48)
    with torch.no_grad():
        dense = model(ids).logits
        dense_steps = _step_logits(model, ids, DynamicCache(config=model.config), prefill=20)
        enable_pod(model, SharingPlan.identity(4, 2, ns=3, nr=6))
        assert_close(model(ids).logits, dense, what=f"{arch} identity prefill")
        pod_steps = _step_logits(model, ids, PodCache(model.config), prefill=20)
    assert_close(pod_steps, dense_steps, what=f"{arch} identity decode")


def _step_logits(model, ids, cache, prefill):
    outs = [model(ids[:, :prefill], past_key_values=cache).logits]
    for t in range(prefill, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ns,nr,prefill", [(4, 8, 30), (2, 16, 10), (3, 5, 7)])
def test_cache_decode_equals_reference(arch, ns, nr, prefill):
    """Teacher-forced: PodCache prefill + one-token steps == reference on the whole sequence.

    prefill < ns+nr < T crosses the window boundary during decoding."""
    model = tiny_model(arch)
    plan = random_plan(4, 2, ns, nr, seed=ns + nr)
    ids = ids_for(2, 40)
    with torch.no_grad():
        enable_pod(model, plan, reference=True)
        ref = model(ids).logits
        disable_pod(model)
        enable_pod(model, plan)
        fast = model(ids).logits
        steps = _step_logits(model, ids, PodCache(model.config), prefill)
    assert_close(fast, ref, what=f"{arch} no-cache fast vs ref")
    assert_close(steps, ref, what=f"{arch} cached decode vs ref")


def _logits_before_after(arch: str, length: int, change) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a tiny model on ``length`` ids before and after ``change(model)`` (no grad)."""
    model, ids = tiny_model(arch), ids_for(1, length)
    with torch.no_grad():
        before = model(ids).logits
        change(model)
        return before, model(ids).logits


def test_plan_changes_outputs():
    """Guard against a vacuous oracle: a sharing plan must differ from dense on these models."""
    dense, pod = _logits_before_after("llama", 40, lambda m: enable_pod(m, SharingPlan.uniform(4, 2, 2, ns=2, nr=4)))
    assert (pod - dense).abs().max() > 1e-3


def _cached_steps_vs_reference(model, plan, ids, prefill, what):
    """PodCache prefill + one-token steps (teacher-forced) == the reference oracle on the whole sequence."""
    with torch.no_grad():
        enable_pod(model, plan, reference=True)
        ref = model(ids).logits
        disable_pod(model)
        enable_pod(model, plan)
        steps = _step_logits(model, ids, PodCache(model.config), prefill=prefill)
    assert_close(steps, ref, what=what)


def test_scores_mode_cache_equals_reference():
    _cached_steps_vs_reference(tiny_model("qwen3"), random_plan(4, 2, 3, 6, seed=1, mode="scores"), ids_for(1, 30),
                               prefill=5, what="scores mode")


def test_chunked_prefill_equals_one_shot():
    model = tiny_model("llama")
    plan = random_plan(4, 2, 4, 8, seed=3)
    ids = ids_for(2, 60)
    with torch.no_grad():
        enable_pod(model, plan)
        one = model(ids, past_key_values=PodCache(model.config)).logits
        cache = PodCache(model.config)
        parts = [model(ids[:, a:b], past_key_values=cache).logits for a, b in [(0, 9), (9, 33), (33, 60)]]
    assert_close(torch.cat(parts, 1), one, what="chunked prefill")


@pytest.mark.parametrize("T", [5, 12, 13, 40, 100])
def test_kv_bytes_equals_formula(T):
    model = tiny_model("llama")
    plan = random_plan(4, 2, 4, 8, seed=5)
    enable_pod(model, plan)
    cache = PodCache(model.config)
    with torch.no_grad():
        model(ids_for(3, T), past_key_values=cache)
        assert cache.kv_bytes() == pod_kv_bytes(model.config, plan, T, batch=3)
        for step in range(15):
            model(ids_for(3, 1, seed=step), past_key_values=cache)
    assert cache.kv_bytes() == pod_kv_bytes(model.config, plan, T + 15, batch=3)
    dense = dense_kv_bytes(model.config, T + 15, batch=3)
    print(f"T={T + 15}: PodCache {cache.kv_bytes()} B vs DynamicCache {dense} B (ratio {cache.kv_bytes() / dense:.3f})")
    assert cache.kv_bytes() <= dense


def test_left_padded_batch_equals_single():
    model = tiny_model("llama")
    plan = random_plan(4, 2, 3, 6, seed=7)
    enable_pod(model, plan)
    prompts = [ids_for(1, 25, seed=1)[0], ids_for(1, 9, seed=2)[0], ids_for(1, 14, seed=3)[0]]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, **kw)[:, width:]
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)[0, len(p):]
            assert torch.equal(together[i], alone), f"row {i}"


def test_decode_fast_path_equals_chunked_path():
    """One-token steps read anchor keys in place (decode.py); the single-SDPA path is the check.
    Left-padded rows of different lengths exercise the padding biases."""
    model = tiny_model("qwen2")
    plan = random_plan(4, 2, 3, 6, seed=11)
    enable_pod(model, plan)
    ids = ids_for(3, 30, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :9] = 0, 0

    def steps():
        cache, outs = PodCache(model.config), []
        outs.append(model(ids[:, :12], attention_mask=mask[:, :12], past_key_values=cache).logits)
        for t in range(12, ids.shape[1]):
            outs.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits)
        return torch.cat(outs, dim=1)

    with torch.no_grad():
        fast = steps()
        model.pod_runtime.decode_fast_path = False
        slow = steps()
    real = mask.bool()
    assert_close(fast[real], slow[real], what="decode fast path vs chunked")


def test_decode_head_wise_plan_equals_reference():
    """3 KV heads: anchors that differ per head, shared heads that are not consecutive ([0, 2]),
    heads of one layer reading three different anchor layers."""
    plan = SharingPlan(anchors=[[0, 0, 0], [0, 1, 0], [2, 1, 0], [2, 3, 0]], ns=3, nr=5)
    _cached_steps_vs_reference(tiny_model("llama", heads=6, kv_heads=3), plan, ids_for(2, 36, seed=9), prefill=9,
                               what="head-wise plan, cached decode vs reference")


def test_generate_uses_pod_cache_by_default():
    model = tiny_model("mistral")
    plan = random_plan(4, 2, 3, 6, seed=9)
    enable_pod(model, plan)
    ids = ids_for(1, 20)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=15, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
        manual = ids
        cache = PodCache(model.config)
        logits = model(manual, past_key_values=cache).logits
        for _ in range(15):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, nxt], 1)
            logits = model(nxt, past_key_values=cache).logits
    assert isinstance(out.past_key_values, PodCache)
    assert torch.equal(out.sequences, manual)


def test_disable_restores_stock_model():
    models = []

    def enable_then_disable(model):
        enable_pod(model, SharingPlan.uniform(4, 2, 2, ns=2, nr=4))
        disable_pod(model)
        models.append(model)

    before, after = _logits_before_after("qwen2", 30, enable_then_disable)
    assert torch.equal(before, after)
    config = models[0].config
    assert not hasattr(config, "pod_plan") and config._attn_implementation == "sdpa"


def test_bad_inputs():
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2))
    with pytest.raises(PodError, match="gpt2"):
        enable_pod(gpt2, SharingPlan.identity(2, 2))
    model = tiny_model("llama")
    with pytest.raises(PodError, match="layers"):
        enable_pod(model, SharingPlan.identity(5, 2))
    windowed = tiny_model("mistral")
    windowed.config.sliding_window = 64
    with pytest.raises(PodError, match="sliding_window"):
        enable_pod(windowed, SharingPlan.identity(4, 2))
