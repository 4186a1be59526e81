"""Token selection on a PodCache (PoD + SnapKV): the compacted cache is exact on the kept tokens."""

import pytest
import torch
from transformers import DynamicCache

from podkv import PodCache, PodError, SharingPlan, enable_pod
from podkv.cache.selection import compact, snapkv_select
from tiny import tiny_model
from tolerances import assert_close


def test_identity_plan_compaction_equals_dense_attention_over_kept_tokens():
    """Every layer its own anchor: PoD+SnapKV must equal dense attention over exactly the kept tokens.

    The oracle is a DynamicCache filled with the dense prefill's K/V gathered at the same indices."""
    model = tiny_model("llama")
    T, keep = 60, 12
    ids = torch.randint(3, 120, (1, T + 3), generator=torch.Generator().manual_seed(0))
    plan = SharingPlan.identity(4, 2, ns=4, nr=10)
    with torch.no_grad():
        dense_cache = DynamicCache(config=model.config)
        model(ids[:, :T], past_key_values=dense_cache)
        enable_pod(model, plan)
        runtime = model.pod_runtime
        runtime.observe_window = 8
        cache = PodCache(model.config)
        model(ids[:, :T], past_key_values=cache)
        runtime.observe_window = None
        kept = snapkv_select(cache, runtime.observed, runtime.observed_scale, keep)
        compact(cache, kept)
        assert cache.get_seq_length() == 4 + keep + 10 and cache.dropped == T - (4 + keep + 10)
        with pytest.raises(PodError, match=f"holds {4 + keep + 10} of the {T} tokens seen, so the next position is {T}"):
            model.generate(ids[:, :T], past_key_values=cache, max_new_tokens=2, do_sample=False)
        with pytest.raises(PodError, match="Pass position_ids explicitly"):
            model(ids[:, T:T + 1], past_key_values=cache)

        oracle = DynamicCache(config=model.config)
        for layer in range(4):
            order = [torch.cat([torch.arange(4), kept[(layer, h)][0], torch.arange(T - 10, T)]) for h in range(2)]
            k, v = dense_cache.layers[layer].keys, dense_cache.layers[layer].values
            oracle.update(torch.stack([k[:, h, order[h]] for h in range(2)], 1),
                          torch.stack([v[:, h, order[h]] for h in range(2)], 1), layer)
        pod_logits, dense_logits = [], []
        for t in range(T, T + 3):  # positions continue from the prompt, not from the shorter cache
            pos = torch.tensor([[t]])
            pod_logits.append(model(ids[:, t:t + 1], past_key_values=cache, position_ids=pos, cache_position=pos[0]).logits)
        from podkv import disable_pod

        disable_pod(model)
        for t in range(T, T + 3):
            pos = torch.tensor([[t]])
            dense_logits.append(model(ids[:, t:t + 1], past_key_values=oracle, position_ids=pos,
                                      cache_position=torch.tensor([oracle.get_seq_length()])).logits)
    assert_close(torch.cat(pod_logits, 1), torch.cat(dense_logits, 1), what="identity PoD+SnapKV vs dense on kept tokens")


def test_blocks_keep_the_same_tokens_in_every_layer():
    """A shared head reads its anchor's keys at the cache index of its own values: same tokens."""
    model = tiny_model("qwen2")
    T, keep = 70, 9
    plan = SharingPlan(anchors=[[0, 0], [0, 1], [2, 1], [2, 3]], ns=3, nr=8)
    ids = torch.randint(3, 120, (1, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        enable_pod(model, plan)
        model.pod_runtime.observe_window = 8
        cache = PodCache(model.config)
        model(ids, past_key_values=cache)
        v_before = [layer.v.clone() for layer in cache.layers]
        kept = snapkv_select(cache, model.pod_runtime.observed, model.pod_runtime.observed_scale, keep)
        assert set(kept) == {(0, 0), (0, 1), (1, 1), (2, 0), (3, 1)}
        compact(cache, kept)
    for layer, anchors in enumerate(plan.anchors):
        for h, a in enumerate(anchors):
            order = torch.cat([torch.arange(3), kept[(a, h)][0], torch.arange(T - 8, T)])
            assert torch.equal(cache.layers[layer].v[0, h], v_before[layer][0, h, order])
