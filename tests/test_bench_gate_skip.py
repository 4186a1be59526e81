"""Gate skipping (paper §2.3): tau > 1 is PoD; tau = 0 is proximal-only attention in shared heads."""

import random

import pytest
import torch

from podkv import PodCache, SharingPlan, disable_pod, enable_pod
from podkv.attention.reference import allowed_mask, pod_attention_reference, proximal_mask
from podkv.errors import PodError
from tiny import tiny_model
from tolerances import assert_close


def random_plan(layers, heads, ns, nr, seed):
    rng = random.Random(seed)
    anchors = [[0] * heads]
    for layer in range(1, layers):
        anchors.append([layer if rng.random() < 0.4 else anchors[-1][h] for h in range(heads)])
    return SharingPlan(anchors=anchors, ns=ns, nr=nr)


def ids_for(batch, T, seed=0):
    return torch.randint(3, 128, (batch, T), generator=torch.Generator().manual_seed(seed))


def step_logits(model, ids, prefill, tau):
    """Teacher-forced PodCache prefill + one-token steps with gate skipping at ``tau``."""
    model.pod_runtime.skip_tau = tau
    model.pod_runtime.skip.reset()
    cache = PodCache(model.config)
    outs = [model(ids[:, :prefill], past_key_values=cache).logits]
    for t in range(prefill, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("arch,ns,nr,prefill", [("llama", 4, 8, 30), ("qwen3", 2, 16, 10)])
def test_never_skipping_equals_pod(arch, ns, nr, prefill):
    model = tiny_model(arch)
    enable_pod(model, random_plan(4, 2, ns, nr, seed=ns + nr))
    ids = ids_for(2, 40)
    with torch.no_grad():
        pod = step_logits(model, ids, prefill, tau=None)
        never = step_logits(model, ids, prefill, tau=1.5)
    stats = model.pod_runtime.skip.summary()
    assert stats["shared_passes"] > 0 and stats["skipped_passes"] == 0
    assert_close(never, pod, what=f"{arch} tau=1.5 vs PoD")


def _oracle_attention(plan, prefill, keys):
    """Reference PoD, except that queries at positions >= prefill in shared heads see proximal keys only."""

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        layer, T = module.layer_idx, key.shape[2]
        keys[layer] = key
        anchor = torch.stack([keys[a][:, h] for h, a in enumerate(plan.anchors[layer])], dim=1)
        out = pod_attention_reference(query, key, anchor, value, ns=plan.ns, nr=plan.nr, scale=module.scaling)
        group = query.shape[1] // key.shape[1]
        idx, pad = torch.arange(T), torch.zeros(key.shape[0], dtype=torch.long)
        ok = (allowed_mask(idx, idx, pad) & proximal_mask(idx, idx, pad, plan.ns, plan.nr))[:, None]
        k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        scores = (query @ k.transpose(-1, -2) * module.scaling).masked_fill(~ok, float("-inf"))
        prox = torch.softmax(scores, -1) @ v  # (B, Hq, T, D)
        for h, a in enumerate(plan.anchors[layer]):
            if a != layer:
                out[:, h * group:(h + 1) * group, prefill:] = prox[:, h * group:(h + 1) * group, prefill:]
        return out.transpose(1, 2).contiguous(), None

    return forward


@pytest.mark.parametrize("ns,nr,prefill", [(2, 6, 12)])
def test_always_skipping_equals_proximal_only(ns, nr, prefill):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from podkv.attention.interface import pod_padding_mask

    plan = random_plan(4, 2, ns, nr, seed=3)
    ids = ids_for(2, 40, seed=1)
    oracle_model = tiny_model("llama")
    AttentionInterface.register("test_gate_oracle", _oracle_attention(plan, prefill, {}))
    AttentionMaskInterface.register("test_gate_oracle", pod_padding_mask)
    oracle_model.set_attn_implementation("test_gate_oracle")
    model = enable_pod(tiny_model("llama"), plan)
    with torch.no_grad():
        expected = oracle_model(ids).logits
        pod = step_logits(model, ids, prefill, tau=None)
        skipped = step_logits(model, ids, prefill, tau=0.0)
    stats = model.pod_runtime.skip.summary()
    assert stats["skipped_passes"] == stats["shared_passes"] > 0
    assert_close(skipped, expected, what="tau=0 vs proximal-only oracle")
    assert (skipped[:, prefill:] - pod[:, prefill:]).abs().max() > 1e-3  # the oracle is not vacuous


def test_padded_batch_and_predictors():
    model = enable_pod(tiny_model("mistral"), random_plan(4, 2, 2, 5, seed=1))
    batch = ids_for(2, 18, seed=4)
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
    with torch.no_grad():
        base = model.generate(batch, **kw)
        model.pod_runtime.skip_tau = 2.0
        assert torch.equal(model.generate(batch, **kw), base)
        for predictor in ("anchor_gate", "anchor_lse"):
            model.pod_runtime.skip.predictor = predictor
            model.pod_runtime.skip_tau = 0.5
            model.generate(batch, **kw)
    assert model.pod_runtime.skip.summary()["shared_passes"] > 0
    disable_pod(model)
    with pytest.raises(PodError, match="predictor"):
        from podkv.attention.gate_skip import GateSkipState

        GateSkipState(predictor="oracle")


def test_bench_skip_refuses_scores_mode_plan():
    """A scores-mode plan has no distant pass of its own to skip: the bench says so instead of reporting 0%."""
    from podkv.bench.skip import SkipConfig, run_skip

    model = tiny_model("llama")
    plan = SharingPlan(anchors=[[0, 0], [0, 0], [2, 2], [2, 2]], ns=2, nr=4, mode="scores")
    with pytest.raises(PodError, match="mode 'scores'"):
        run_skip(model, None, plan, SkipConfig())
