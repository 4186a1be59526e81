"""``scores`` mode, one distant pass per block (attention/block_pass.py) against the reference oracle.

The exactness argument: in scores mode a block's layers share the distant softmax (anchor query · anchor
key), so the anchor's probabilities weighted by each member's values, merged with the member's own
proximal pass by log-sum-exp, is the reference's single softmax. Checked here end to end: logits of a
PodCache fed in chunks of at most nr tokens and then token by token == the materialised reference on the
whole sequence, for head-wise and layer plans, left-padded batches, and bf16.
"""

import types

import pytest
import torch

from podkv import PodCache, SharingPlan, disable_pod, enable_pod
from podkv.attention import block_pass
from podkv.compat import cache_kwargs
from test_core_model import ids_for, random_plan
from tiny import ARCHS, tiny_model
from tolerances import DIFFERS, assert_close


def _reference(model, plan, ids, mask=None):
    enable_pod(model, plan, reference=True)
    ref = model(ids, attention_mask=mask).logits
    disable_pod(model)
    return ref


def _fed(model, plan, ids, sizes, mask=None, prefill_chunk=None):
    """Logits of ids fed into a fresh PodCache in pieces of ``sizes`` (the last size repeats)."""
    enable_pod(model, plan)
    model.pod_runtime.prefill_chunk = prefill_chunk
    cache, outs, t, sizes = PodCache(model.config), [], 0, list(sizes)
    while t < ids.shape[1]:
        n = sizes.pop(0) if len(sizes) > 1 else sizes[0]
        m = None if mask is None else mask[:, :t + n]
        outs.append(model(ids[:, t:t + n], attention_mask=m, **cache_kwargs(cache)).logits)
        t += n
    disable_pod(model)
    return torch.cat(outs, dim=1)


@pytest.fixture
def count_block_steps(monkeypatch):
    """Counts calls of the block path, so a test cannot pass by taking the general path."""
    calls = []
    real = block_pass.pod_block_attention

    def spy(*a, **k):
        calls.append(a[0].layer)
        return real(*a, **k)
    monkeypatch.setattr("podkv.attention.interface.pod_block_attention", spy)
    return calls


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("granularity", ["head", "layer"])
@pytest.mark.parametrize("ns,nr,sizes", [(4, 8, (8, 5, 1)), (2, 6, (3,)), (3, 5, (1,))])
def test_chunks_and_decode_equal_reference(arch, granularity, ns, nr, sizes, count_block_steps):
    model = tiny_model(arch)
    plan = random_plan(4, 2, ns, nr, seed=ns + nr, mode="scores")
    if granularity == "layer":
        plan = SharingPlan.uniform(4, 2, 2, ns=ns, nr=nr, mode="scores")
    ids = ids_for(2, 40)
    with torch.no_grad():
        ref = _reference(model, plan, ids)
        fast = _fed(model, plan, ids, sizes)
    assert_close(fast, ref, what=f"{arch} {granularity} chunks {sizes} vs reference")
    assert len(count_block_steps) > 0 and set(count_block_steps) == set(range(4))


def test_left_padded_batch_equals_reference(count_block_steps):
    model = tiny_model("llama")
    plan = random_plan(4, 2, 3, 6, seed=1, mode="scores")
    ids = ids_for(3, 36, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :9], mask[1, :2] = 0, 0  # rows padded by 9, 2 and 0 tokens: the first chunk is all padding in row 0
    with torch.no_grad():
        ref = _reference(model, plan, ids, mask)
        fast = _fed(model, plan, ids, (6, 4, 1), mask)
    real = mask.bool()
    assert_close(fast[real], ref[real], what="left-padded chunks + decode vs reference")
    assert count_block_steps


@pytest.mark.parametrize("tile", [1, 7, 40])
def test_score_tiles_equal_reference(monkeypatch, tile, count_block_steps):
    """The distant pass split into tiles of a few scores (one head, a few rows each; prefill's cache-sized
    tiles on the real model) equals the reference, padding rows included."""
    monkeypatch.setattr(block_pass, "TILE", tile)
    model = tiny_model("llama")
    plan = random_plan(4, 2, 3, 6, seed=7, mode="scores")
    ids = ids_for(2, 34, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        ref = _reference(model, plan, ids, mask)
        fast = _fed(model, plan, ids, (6, 6, 1), mask)
    real = mask.bool()
    assert_close(fast[real], ref[real], what=f"score tiles of {tile} vs reference")
    assert count_block_steps


def test_bf16_within_bf16_tolerance():
    model = tiny_model("llama")
    plan = random_plan(4, 2, 3, 6, seed=3, mode="scores")
    ids = ids_for(1, 30, seed=3)
    with torch.no_grad():
        ref = _reference(model, plan, ids)
        fast = _fed(model.to(torch.bfloat16), plan, ids, (6, 1))
    assert_close(fast, ref, dtype=torch.bfloat16, what="bf16 block path vs fp32 reference")


def test_identity_scores_plan_equals_dense():
    """Every layer its own anchor: the block path is dense attention (a proximal and a distant pass merged)."""
    model = tiny_model("qwen2")
    ids = ids_for(2, 30, seed=5)
    with torch.no_grad():
        dense = model(ids).logits
        fast = _fed(model, SharingPlan.identity(4, 2, ns=2, nr=5, mode="scores"), ids, (5, 1))
    assert_close(fast, dense, what="identity scores plan vs dense")


@pytest.mark.parametrize("granularity", ["head", "layer"])
@pytest.mark.parametrize("sizes", [(40,), (20, 1), (7, 13, 11, 1)])
def test_steps_longer_than_nr_equal_reference(granularity, sizes, count_block_steps):
    """Steps of more than nr tokens read some of their own tokens as distant: the anchor keeps those exp-scores
    and each member applies them to the values it stores on its turn. Whole prompt in one step included."""
    model = tiny_model("llama")
    plan = random_plan(4, 2, 2, 4, seed=4, mode="scores")
    if granularity == "layer":
        plan = SharingPlan.uniform(4, 2, 2, ns=2, nr=4, mode="scores")
    ids = ids_for(2, 40, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        ref = _reference(model, plan, ids, mask)
        fast = _fed(model, plan, ids, sizes, mask, prefill_chunk=64)  # the model may feed whole steps at once
    real = mask.bool()
    assert_close(fast[real], ref[real], what=f"{granularity} steps {sizes} vs reference")
    assert len(count_block_steps) > 0 and set(count_block_steps) == set(range(4))


def test_steps_past_the_limit_take_the_general_path(monkeypatch, count_block_steps):
    """Past STEP_LIMIT (the kept exp-scores grow with the step's square) a step that continues a cache takes the
    general path, still exact, and says so once."""
    monkeypatch.setattr(block_pass, "STEP_LIMIT", 8)
    model = tiny_model("llama")
    plan = random_plan(4, 2, 2, 4, seed=4, mode="scores")
    ids = ids_for(1, 24, seed=4)
    with torch.no_grad():
        ref = _reference(model, plan, ids)
        with pytest.warns(UserWarning, match="general path"):
            fast = _fed(model, plan, ids, (4, 16, 1), prefill_chunk=64)
    assert_close(fast, ref, what="short step, long step, then decode")
    assert len(count_block_steps) == 5 * 4  # the first 4-token step and the 4 one-token steps


def test_a_long_first_step_takes_the_two_pass_prefill(monkeypatch, count_block_steps):
    """A first step past STEP_LIMIT without padding is a one-shot prefill: the two-pass path (prefill.py) with
    the anchors' queries for distant keys, exact and without the general path's warning."""
    import warnings

    import podkv.attention.chunked as chunked

    monkeypatch.setattr(block_pass, "STEP_LIMIT", 8)
    calls = []
    real, real_own = chunked.pod_prefill, chunked._prefill_own_anchors_causal
    monkeypatch.setattr(chunked, "pod_prefill", lambda *a, **k: calls.append("two-pass") or real(*a, **k))
    monkeypatch.setattr(chunked, "_prefill_own_anchors_causal", lambda *a, **k: calls.append("own") or real_own(*a, **k))
    model = tiny_model("llama")
    plan = random_plan(4, 2, 2, 4, seed=4, mode="scores")
    ids = ids_for(1, 24, seed=4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = _reference(model, plan, ids)
        fast = _fed(model, plan, ids, (20, 1), prefill_chunk=64)
    assert_close(fast, ref, what="one-shot scores prefill then decode")
    # Every layer's prefill: heads that are their own anchor in one causal call, the others two-pass.
    own = [sum(a == layer for a in heads) for layer, heads in enumerate(plan.anchors)]
    assert calls.count("own") == sum(n > 0 for n in own) and calls.count("two-pass") == sum(n < 2 for n in own)
    assert "own" in calls and "two-pass" in calls and len(count_block_steps) == 4 * 4  # both kinds; the decode steps


def test_long_input_is_fed_in_chunks_of_nr(count_block_steps):
    """One forward over 30 tokens with nr = 4, continuing a cache or padded: the model feeds 8 steps of <= 4
    tokens, all on the block path, returning the logits of every position as one forward would."""
    model = tiny_model("mistral")
    plan = random_plan(4, 2, 2, 4, seed=6, mode="scores")
    ids = ids_for(2, 31, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        ref = _reference(model, plan, ids, mask)
        enable_pod(model, plan)
        cache = PodCache(model.config)
        first = model(ids[:, :1], attention_mask=mask[:, :1], **cache_kwargs(cache)).logits
        out = model(ids[:, 1:], attention_mask=mask, **cache_kwargs(cache))  # continues the cache
        last = model(ids, attention_mask=mask, logits_to_keep=3).logits  # a fresh PodCache by default; padded
    real = mask.bool()
    assert_close(torch.cat([first, out.logits], dim=1)[real], ref[real], what="one call, chunked inside")
    assert_close(last[real[:, -3:]], ref[:, -3:][real[:, -3:]], what="logits_to_keep=3")
    assert len(count_block_steps) == (1 + 8 + 8) * 4 and cache.get_seq_length() == 31  # steps x layers


def test_a_first_unpadded_prompt_goes_in_one_step(monkeypatch, count_block_steps):
    """The default: a whole unpadded prompt in one forward through the two-pass prefill (no block pass),
    exact; decoding after it takes the block path. prefill_chunk forces steps."""
    import podkv.attention.chunked as chunked

    calls = []  # query lengths of the layer calls that take the one-shot prefill (two passes or own anchors' causal)
    real = chunked._split_applies
    monkeypatch.setattr(chunked, "_split_applies", lambda q, *a: (real(q, *a) and not calls.append(q.shape[2])) or False)
    model = tiny_model("mistral")
    plan = random_plan(4, 2, 2, 4, seed=6, mode="scores")
    ids = ids_for(2, 30, seed=6)
    with torch.no_grad():
        ref = _reference(model, plan, ids)
        fast = _fed(model, plan, ids, (28, 1))
        assert calls == [28] * 4 and len(count_block_steps) == 2 * 4  # the two one-token steps
        stepped = _fed(model, plan, ids, (28, 1), prefill_chunk=4)
    assert_close(fast, ref, what="one-shot prefill then decode")
    assert_close(stepped, ref, what="forced steps of 4")
    assert len(count_block_steps) == 2 * 4 + (7 + 2) * 4
    import podkv.models.chunked_forward as chunked_forward

    monkeypatch.setattr(chunked_forward, "ONE_SHOT_MAX", 16)  # longer prompts go in steps of nr
    with torch.no_grad():
        long = _fed(model, plan, ids, (28, 1))
    assert_close(long, ref, what="past ONE_SHOT_MAX: steps of nr")
    assert calls == [28] * 4 and len(count_block_steps) == 2 * 4 + (7 + 2) * 4 + (7 + 2) * 4


def test_one_forward_rule_is_what_the_speed_benchmark_reports(monkeypatch):
    """The feed rule of chunked_forward, and the speed benchmark's label for it, come from one predicate."""
    import podkv.models.chunked_forward as chunked_forward
    from podkv.attention.interface import PodRuntime
    from podkv.bench.speed import prefill_feed

    plan = random_plan(4, 2, 2, 4, seed=6, mode="scores")
    runtime = PodRuntime(plan=plan)
    monkeypatch.setattr(chunked_forward, "ONE_SHOT_MAX", 16)
    one = chunked_forward.one_forward
    assert one(runtime, 16) and not one(runtime, 17)  # a first prompt up to ONE_SHOT_MAX
    assert one(runtime, plan.nr, past=20, padded=True)  # one step's worth always
    assert not one(runtime, 12, past=20) and not one(runtime, 12, padded=True)
    model = types.SimpleNamespace(pod_runtime=runtime)
    assert prefill_feed(model, plan, 16) == "one forward" and prefill_feed(model, plan, 17) == f"{plan.nr}-token steps"
    monkeypatch.setattr(chunked_forward, "ONE_SHOT_MAX_COMPILED", 40)  # the compiled kernel: longer one-shot prompts
    assert one(runtime, 40, compiled=True) and not one(runtime, 41, compiled=True) and not one(runtime, 40)
    assert not one(runtime, 20, padded=True, compiled=True) and not one(runtime, 20, past=1, compiled=True)
    runtime.prefill_chunk = 4
    assert not one(runtime, 16) and one(runtime, 4) and prefill_feed(model, plan, 16) == "4-token steps"


def test_block_members_follow_the_plan():
    plan = SharingPlan(anchors=[[0, 0], [0, 1], [2, 1], [2, 1]], ns=1, nr=2, mode="scores")
    assert list(block_pass.block_members(plan, 0, 0)) == [0, 1]
    assert list(block_pass.block_members(plan, 1, 1)) == [1, 2, 3]
    assert list(block_pass.block_members(plan, 2, 0)) == [2, 3]


def test_scores_plan_differs_from_dense():
    """Guard against a vacuous oracle: the scores plans above change the outputs."""
    model = tiny_model("llama")
    ids = ids_for(2, 40)
    with torch.no_grad():
        dense = model(ids).logits
        ref = _reference(model, random_plan(4, 2, 3, 5, seed=8, mode="scores"), ids)
    assert (ref - dense).abs().max() > DIFFERS[0]


@pytest.mark.parametrize("mode", ["keys", "scores"])
def test_forward_without_a_cache_holds_nothing_afterwards(mode):
    """use_cache on and no cache given: a PodCache (not a DynamicCache holding every key); use_cache off:
    the forward's per-layer keys and queries are dropped when it ends."""
    from podkv.compat import output_cache

    model = enable_pod(tiny_model("llama"), random_plan(4, 2, 2, 4, seed=7, mode=mode))
    ids = ids_for(1, 20, seed=7)
    with torch.no_grad():
        assert isinstance(output_cache(model(ids, use_cache=True)), PodCache)
        model(ids, use_cache=False)
    assert not model.pod_runtime.keys and not model.pod_runtime.queries


@pytest.mark.parametrize("split", [2, 3, 4])
@pytest.mark.parametrize("granularity", ["head", "layer", "window"])
@pytest.mark.parametrize("kernel", ["pytorch", "native"])
def test_split_key_decode_equals_reference(monkeypatch, split, granularity, kernel):
    """Batch-1 decode cuts each head's distant keys into ``split`` chunks (one batched product, parallel on
    CPU), starting early and masking the extra columns: still the reference, for every step length of the span.
    ``native``: the compiled kernels instead (attention/native): chunks of ``split`` keys, and the proximal pass
    merged with the distant cells (window-only heads: total 0, peak -inf, never read)."""
    from podkv.attention import native

    monkeypatch.setattr(block_pass, "SPLIT", split)
    monkeypatch.setattr(block_pass, "SPLIT_MIN_KEYS", 1)
    monkeypatch.setattr(native, "CHUNK", split)
    if kernel == "native" and not native.enabled():
        pytest.skip("no C compiler here: the PyTorch path is what runs")
    monkeypatch.setattr(block_pass, "NATIVE", kernel == "native")
    taken = []
    path = "_anchor_distant_native" if kernel == "native" else "_anchor_distant_split"
    real = getattr(block_pass, path)
    monkeypatch.setattr(block_pass, path, lambda *a: taken.append(1) or real(*a))
    merged = []  # the proximal pass and merge: the kernel's, when native
    real_merge = native.proximal_merge
    monkeypatch.setattr(native, "proximal_merge", lambda *a: merged.append(1) or real_merge(*a))
    model = tiny_model("llama")
    plan = random_plan(4, 2, 4, 5, seed=11, mode="scores")
    if granularity == "layer":
        plan = SharingPlan.uniform(4, 2, 2, ns=4, nr=5, mode="scores")
    if granularity == "window":  # window-only pairs: their heads get no distant part (weighed 0 in the merge)
        from test_window_policy import window_plan
        plan = window_plan(seed=1, mode="scores", ns=4, nr=5)
        assert plan.has_window
    ids = ids_for(1, 44, seed=11)
    with torch.no_grad():
        ref = _reference(model, plan, ids)
        fast = _fed(model, plan, ids, (5, 5, 1))
    assert_close(fast, ref, what=f"split {split} decode ({kernel}) vs reference")
    assert taken and bool(merged) == (kernel == "native")


def test_native_kernel_builds_once_and_a_failed_build_falls_back(monkeypatch, tmp_path):
    """The kernel is cached under PODKV_HOME/native (a second load compiles nothing); a compiler that fails
    gives a warning and the PyTorch path, and PODKV_NATIVE=0 switches the kernel off."""
    from podkv.attention import native

    monkeypatch.setenv("PODKV_HOME", str(tmp_path))
    monkeypatch.delenv("PODKV_NATIVE_DIR", raising=False)  # the suite's own build folder (conftest)
    native.library.cache_clear()
    try:
        if native.shutil.which("cc") or native.shutil.which("gcc"):
            assert native.library() is not None
            built = list((tmp_path / "native").glob(f"*/{native.LIBRARY}"))
            assert len(built) == 1 and not list((tmp_path / "native").glob("*/tmp*"))
            native.library.cache_clear()
            assert native.library() is not None and list((tmp_path / "native").glob(f"*/{native.LIBRARY}")) == built
        monkeypatch.setenv("PODKV_NATIVE", "0")
        assert not native.enabled()
        monkeypatch.delenv("PODKV_NATIVE")
        monkeypatch.setenv("CC", "false")
        native.library.cache_clear()
        with pytest.warns(UserWarning, match="native kernels did not build"):
            assert native.library() is None
        assert not native.enabled()
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("anchor,ring", [([0], [1, 2]), ([1], [0, 2]), ([0, 2], [1]), ([0, 1, 2], []), ([], [0, 1, 2])])
def test_unstack_puts_heads_back_in_order(anchor, ring):
    """[anchor | ring] stacks back in head order by one cat of slices (heads.stacked_runs / unstack)."""
    from podkv.attention.heads import stacked_runs, unstack

    x = torch.randn(2, 3, 5, 4)
    stacked = anchor + ring
    runs = stacked_runs([stacked.index(h) for h in range(3)], len(anchor))
    out = unstack((x[:, anchor], x[:, ring]), runs)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
