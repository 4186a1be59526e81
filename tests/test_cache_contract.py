"""PodCache as a transformers Cache: crop, beam reorder, batch edits, reset; clear errors, never silent ones.

Oracle for every edit: a fresh PodCache fed the edited token sequence (teacher-forced), which the
rest of the suite checks against the plain-PyTorch reference.
"""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from podkv import PodCache, PodError, SharingPlan, enable_pod
from podkv.compat import cache_kwargs
from podkv.cache.memory import pod_kv_bytes
from tiny import tiny_model
from tolerances import assert_close
from eval_fixtures import _one_thread  # noqa: F401  (pytest fixture: one thread per module)

PLAN = SharingPlan(anchors=[[0, 0], [0, 1], [2, 1], [2, 3]], ns=3, nr=5)


@pytest.fixture
def model():
    return enable_pod(tiny_model("llama"), PLAN)


def ids_for(batch, T, seed=0):
    return torch.randint(3, 128, (batch, T), generator=torch.Generator().manual_seed(seed))


def feed(model, cache, ids, mask=None, start=0, chunks=(1,)):
    """Feed ids[:, start:] into ``cache`` in pieces of the given sizes (last size repeats) -> logits."""
    outs, t, sizes = [], start, list(chunks)
    while t < ids.shape[1]:
        n = sizes.pop(0) if len(sizes) > 1 else sizes[0]
        m = None if mask is None else mask[:, :t + n]
        outs.append(model(ids[:, t:t + n], attention_mask=m, **cache_kwargs(cache)).logits)
        t += n
    return torch.cat(outs, dim=1)


def fresh(model, ids, mask=None, prefill=8, **cache_kw):
    cache = PodCache(model.config, **cache_kw)
    return cache, feed(model, cache, ids, mask, chunks=(prefill, 1))


# ------------------------------------------------------------------ crop
@pytest.mark.parametrize("margin,total,back,chunks", [
    (0, 24, 1, (16, 1)),     # no margin: one step back is always exact
    (3, 24, 4, (16, 1)),     # margin M: M+1 back
    (3, 24, 4, (19, 5)),     # a verification chunk of 5, 4 rejected (assisted decoding's pattern)
    (6, 9, 5, (9,)),         # still shorter than ns+nr+M: every token held in order
])
def test_crop_then_continue_equals_fresh_cache(model, margin, total, back, chunks):
    ids = ids_for(2, total + 6, seed=margin)
    with torch.no_grad():
        _, expected = fresh(model, ids)
        cache = PodCache(model.config, crop_margin=margin)
        feed(model, cache, ids[:, :total], chunks=chunks)
        cache.crop(-back)
        assert cache.get_seq_length() == total - back
        after = feed(model, cache, ids, start=total - back)
    assert_close(after, expected[:, total - back:], what=f"crop by {back} with margin {margin}")


def test_crop_deeper_than_the_margin_is_an_error_and_changes_nothing(model):
    ids = ids_for(1, 20)
    with torch.no_grad():
        cache, _ = fresh(model, ids, crop_margin=1)
        with pytest.raises(PodError, match="crop_margin"):
            cache.crop(-3)
        assert cache.get_seq_length() == 20
        cache.crop(-2)  # margin + 1: fine


def test_crop_negative_and_to_zero(model):
    ids = ids_for(1, 20, seed=4)
    with torch.no_grad():
        _, expected = fresh(model, ids)
        cache, _ = fresh(model, ids[:, :15])
        cache.crop(-1)  # drop one token
        assert_close(feed(model, cache, ids, start=14), expected[:, 14:], what="crop(-1)")
        cache.crop_to(0)  # empty (crop(0) means that on transformers 5.2 only: compat.py)
        assert cache.get_seq_length() == 0
        assert_close(feed(model, cache, ids, chunks=(8, 1)), expected, what="after crop(0)")


def test_crop_with_left_padding(model):
    ids = ids_for(2, 26, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        _, expected = fresh(model, ids, mask, crop_margin=2)
        cache, _ = fresh(model, ids[:, :22], mask[:, :22], crop_margin=2)
        cache.crop(-3)
        after = feed(model, cache, ids, mask, start=19)
    assert_close(after[mask[:, 19:].bool()], expected[:, 19:][mask[:, 19:].bool()], what="crop, left-padded")


# ------------------------------------------------------ beam search, batch edits
def padded_batch(seed=6):
    ids = ids_for(3, 22, seed)
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :9] = 0, 0
    return ids, mask


@pytest.mark.parametrize("edit,rows", [
    ("reorder_cache", [2, 0, 0]),
    ("batch_select_indices", [1, 2]),
    ("batch_repeat_interleave", [0, 0, 1, 1, 2, 2]),
])
def test_batch_edit_equals_fresh_cache_of_those_rows(model, edit, rows):
    """Rows of different padding: the padding count travels with its row."""
    ids, mask = padded_batch()
    cut = 15
    rows_t = torch.tensor(rows)
    with torch.no_grad():
        cache, _ = fresh(model, ids[:, :cut], mask[:, :cut])
        arg = {"reorder_cache": rows_t, "batch_select_indices": rows_t, "batch_repeat_interleave": 2}[edit]
        getattr(cache, edit)(arg)
        assert cache.max_batch_size == len(rows)
        after = feed(model, cache, ids[rows_t], mask[rows_t], start=cut)
        _, expected = fresh(model, ids[rows_t], mask[rows_t])
    real = mask[rows_t][:, cut:].bool()
    assert_close(after[real], expected[:, cut:][real], what=edit)


def test_reset_reuses_the_object(model):
    with torch.no_grad():
        cache, _ = fresh(model, ids_for(2, 20, seed=1))
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.max_batch_size == -1
        ids = ids_for(3, 18, seed=2)
        again = feed(model, cache, ids, chunks=(8, 1))
        _, expected = fresh(model, ids)
    assert_close(again, expected, what="after reset")


@pytest.mark.parametrize("T", [5, 12, 30])
def test_kv_bytes_with_crop_margin_equals_formula(model, T):
    with torch.no_grad():
        cache, _ = fresh(model, ids_for(2, T), prefill=min(T, 8), crop_margin=4)
    assert cache.kv_bytes() == pod_kv_bytes(model.config, PLAN, T, batch=2, crop_margin=4)
    assert pod_kv_bytes(model.config, PLAN, T, batch=2, crop_margin=0) == pod_kv_bytes(model.config, PLAN, T, batch=2)


# ------------------------------------------------- no global state between forwards
def test_stray_update_is_an_error_and_leaks_into_no_other_forward(model):
    """It used to leave a module-global 'active layer' set, which hijacked the next forward's layer 0."""
    ids = ids_for(1, 12)
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
        k = torch.randn(1, 2, 3, 16)
        with pytest.raises(PodError, match="outside a forward"):
            PodCache(model.config).update(k, k, 0)
        assert torch.equal(model(ids, use_cache=False).logits, before)
        assert model.pod_runtime.caches == []


def test_failed_forward_leaves_no_state_and_a_clear_error(model):
    ids = ids_for(1, 12)
    cache = PodCache(model.config)
    boom = model.model.layers[2].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"):
            model(ids, **cache_kwargs(cache))
        boom.remove()
        assert model.pod_runtime.caches == [] and cache.in_forward == 0
        with pytest.raises(PodError, match="half-updated"):
            model(ids, **cache_kwargs(cache))


# ----------------------------------------------------- other caches and bad inputs
def test_dynamic_cache_is_exact(model):
    """A DynamicCache returns every key, so PoD's full-keys path is exact (with no memory saving)."""
    ids = ids_for(2, 20, seed=3)
    with torch.no_grad():
        _, expected = fresh(model, ids)
        dynamic = feed(model, DynamicCache(), ids, chunks=(8, 1))
    assert_close(dynamic, expected, what="DynamicCache vs PodCache")


def test_static_cache_is_an_error(model):
    with torch.no_grad(), pytest.raises(PodError, match="StaticCache"):
        model(ids_for(1, 8), **cache_kwargs(StaticCache(config=model.config, max_cache_len=32)))


def test_pod_cache_on_a_stock_model_is_an_error():
    stock = tiny_model("llama")
    with torch.no_grad(), pytest.raises(PodError, match="enable_pod"):
        stock(ids_for(1, 8), **cache_kwargs(PodCache(stock.config, PLAN)))


@pytest.mark.parametrize("field,value", [("ns", 2), ("nr", 6), ("mode", "scores"),
                                         ("anchors", [[0, 0], [0, 1], [0, 1], [3, 1]])])
def test_pod_cache_of_another_plan_is_an_error(model, field, value):
    other = SharingPlan(**{**{k: getattr(PLAN, k) for k in ("anchors", "ns", "nr", "mode")}, field: value})
    with torch.no_grad(), pytest.raises(PodError, match=f"'{field}'"):
        model(ids_for(1, 8), **cache_kwargs(PodCache(model.config, other)))


def test_right_padding_is_an_error_that_says_left(model):
    ids = ids_for(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad(), pytest.raises(PodError, match="padding_side = 'left'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)


def test_input_beyond_max_positions_is_an_error(model):
    with torch.no_grad():
        with pytest.raises(PodError, match="max_position_embeddings=512"):
            model(ids_for(1, 513))
        cache = PodCache(model.config)
        model(ids_for(1, 500), **cache_kwargs(cache))
        with pytest.raises(PodError, match="after 500 cached"):
            model(ids_for(1, 13), **cache_kwargs(cache))


def test_bad_crop_margin():
    with pytest.raises(PodError, match="crop_margin"):
        PodCache(tiny_model("llama").config, PLAN, crop_margin=-1)
