"""Quantized PodCache storage (``kv_bits`` 8, 4 and 2, issue 21): rounding bound, indexing, real bytes = formula, and
PoD over it tracks the fp32 PodCache on every plan kind (keys, scores, window-only pairs), through crop and batch
edits."""

import pytest
import torch

from podkv import PodCache, SharingPlan, disable_pod, enable_pod
from podkv.cache.quant import QuantChannels, QuantTokens, dequantize, quantize
from podkv.cache.memory import dense_kv_bytes, pod_kv_bytes
from podkv.compat import cache_kwargs
from podkv.errors import PodError
from test_core_model import ids_for, random_plan
from test_window_policy import window_plan
from tiny import tiny_config, tiny_model
from tolerances import KV2_LOGITS_ATOL, KV4_LOGITS_ATOL, KV8_LOGITS_ATOL, TOL


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_trip_error_is_half_a_step(bits):
    x = torch.randn(2, 3, 50, 64, generator=torch.Generator().manual_seed(0)) * 3
    codes, scale, zero = quantize(x, 32, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 50, 64 * bits // 8) and scale.shape == (2, 3, 50, 2)
    g = x.unflatten(-1, (2, 32))
    torch.testing.assert_close(scale, (g.amax(-1) - g.amin(-1)) / (2 ** bits - 1))  # (max - min) / (2^bits - 1)
    err = (dequantize(codes, scale, zero, 32, x.dtype, bits) - x).abs().unflatten(-1, (2, 32)).amax(-1)
    assert bool((err <= scale / 2 * (1 + TOL[torch.float32][0]) + 1e-6).all())


def test_4bit_packs_first_half_low_nibble_second_half_high():
    x = torch.arange(16.0)  # one group of 16 channels, min 0 and max 15: scale 1, code = value
    codes, scale, zero = quantize(x, 16, 4)
    assert codes.tolist() == [c | (c + 8) << 4 for c in range(8)]
    assert torch.equal(dequantize(codes, scale, zero, 16, x.dtype, 4), x)


def test_2bit_packs_four_quarters_into_one_byte():
    x = torch.tensor([0.0, 1, 2, 3] * 4)  # one group of 16 channels, min 0 and max 3: scale 1, code = value
    codes, scale, zero = quantize(x, 16, 2)
    assert codes.tolist() == [x[c] + 4 * x[c + 4] + 16 * x[c + 8] + 64 * x[c + 12] for c in range(4)]
    assert torch.equal(dequantize(codes, scale, zero, 16, x.dtype, 2), x)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_tokens_index_like_the_tensor(bits):
    x = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(1))
    store = QuantTokens(x[:, :, :0], 8, bits)
    store.append(x[:, :, :30])
    store.append(x[:, :, 30:])  # grows past the first buffer
    full = store[:, :]
    assert store.shape == x.shape and full.shape == x.shape
    for index in [(slice(None), slice(1, 3), slice(5, 17)), (slice(None), 2, slice(0, 9)), (1,)]:
        assert torch.equal(store[index], full[index])
    store.crop(25)
    assert store.shape[2] == 25 and torch.equal(store[:, :], full[:, :, :25])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_channel_keys_index_like_the_tensor_and_bound_the_error_per_channel(bits):
    """KIVI's layout: full groups of 8 tokens quantised per channel (error <= half a step of that channel's
    range over the group), the unfilled group held exactly; reads, crops and batch edits as on the tensor."""
    x = torch.randn(2, 3, 45, 16, generator=torch.Generator().manual_seed(1))
    x[..., 5] *= 40  # an outlier channel (KIVI's observation about keys)
    store = QuantChannels(x[:, :, :0], 8, bits)
    for a, b in ((0, 13), (13, 14), (14, 45)):  # a prefill, one decode token, a chunk that fills several groups
        store.append(x[:, :, a:b])
    full = store[:, :]
    assert store.shape == x.shape and store.Tq == 40 and torch.equal(full[:, :, 40:], x[:, :, 40:])
    g = x[:, :, :40].unflatten(2, (5, 8))
    step = (g.amax(3) - g.amin(3)) / (2 ** bits - 1)  # (B, H, groups, D)
    err = (full[:, :, :40] - x[:, :, :40]).abs().unflatten(2, (5, 8)).amax(3)
    assert bool((err <= step / 2 * (1 + TOL[torch.float32][0]) + 1e-6).all())
    per_token = QuantTokens(x[:, :, :0], 8, bits)
    per_token.append(x)
    assert (full - x).abs().mean() < (per_token[:, :] - x).abs().mean()  # the outlier no longer costs the others
    for index in [(slice(None), slice(1, 3), slice(5, 17)), (slice(None), 2, slice(0, 9)), (1,), (0, 1, slice(38, 45)),
                  (slice(None), slice(None), 42), (slice(None), slice(None), slice(20, 20))]:
        assert torch.equal(store[index], full[index]), index
    store.map_batch(lambda t: t.flip(0))
    assert torch.equal(store[:, :], full.flip(0))
    store.crop(43)
    assert torch.equal(store[:, :], full.flip(0)[:, :, :43])
    store.crop(21)  # inside a quantised group: its first 5 tokens go back to the residual, as read
    assert store.Tq == 16 and torch.equal(store[:, :], full.flip(0)[:, :, :21])
    assert [tuple(t.shape) for t in store.tensors()] == [(2, 3, 0, 16), (2, 3, 16, 16 * bits // 8), (2, 3, 2, 16),
                                                         (2, 3, 2, 16), (2, 3, 5, 16)]


@pytest.mark.parametrize("layout", [QuantTokens, QuantChannels])
def test_kept_first_and_last_tokens_stay_exact(layout):
    """keep_first tokens, then the last keep_last of every append, are held in the model's dtype; the tokens between
    are coded once they leave the kept tail (the channel layout: in whole groups)."""
    x = torch.randn(1, 2, 60, 16, generator=torch.Generator().manual_seed(2))
    store = layout(x[:, :, :0], 8, 4, keep_first=5)
    for t in range(0, 60, 7):
        store.append(x[:, :, t:t + 7], keep_last=12)
    full = store[:, :]
    assert torch.equal(full[:, :, :5], x[:, :, :5]) and torch.equal(full[:, :, -12:], x[:, :, -12:])
    coded = 43 if layout is QuantTokens else 40  # 60 - 5 - 12, in groups of 8 for channels
    assert store.Tq == coded and not torch.equal(full[:, :, 5:5 + coded], x[:, :, 5:5 + coded])
    assert torch.equal(full[:, :, 5 + coded:], x[:, :, 5 + coded:])
    store.crop(3)
    assert store.T == 3 and store.Tq == 0 and torch.equal(store[:, :], x[:, :, :3])


@pytest.mark.parametrize("plan_kind", ["keys", "scores", "window"])
def test_pod_over_quantized_cache_tracks_fp32_and_bytes_equal_formula(plan_kind):
    model = tiny_model("llama")
    plan = window_plan(seed=5) if plan_kind == "window" else random_plan(4, 2, 3, 6, seed=2, mode=plan_kind)
    ids = ids_for(2, 40, seed=3)
    enable_pod(model, plan)
    outs = {}
    settings = [(None, "token", False), (8, "token", False), (4, "token", False), (8, "channel", False),
                (4, "channel", False), (4, "token", True), (4, "channel", True), (2, "channel", True)]
    with torch.no_grad():
        for bits, keys, prox in settings:
            cache = PodCache(model.config, kv_bits=bits, kv_group=8, key_quant=keys, kv_keep_proximal=prox)
            logits = [model(ids[:, :30], **cache_kwargs(cache)).logits]
            logits += [model(ids[:, t:t + 1], **cache_kwargs(cache)).logits for t in range(30, 40)]
            outs[bits, keys, prox] = torch.cat(logits, dim=1)
            assert cache.kv_bytes() == pod_kv_bytes(model.config, plan, 40, batch=2, kv_bits=bits, kv_group=8,
                                                    key_quant=keys, kv_keep_proximal=prox)
    disable_pod(model)
    exact = outs[None, "token", False]
    for (bits, keys, prox), out in outs.items():
        if bits:
            atol = {8: KV8_LOGITS_ATOL, 4: KV4_LOGITS_ATOL, 2: KV2_LOGITS_ATOL}[bits]
            torch.testing.assert_close(out, exact, rtol=0, atol=atol)
            assert not torch.equal(out, exact)  # it really is quantized
    assert not torch.equal(outs[4, "channel", False], outs[4, "token", False])
    # the proximal tokens exact: the prefill's logits (every query's proximal window still exact) move less
    assert (outs[4, "channel", True] - exact).abs().sum() < (outs[4, "channel", False] - exact).abs().sum()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_bytes_at_4k_follow_the_bit_width(bits):
    """SmolLM2's head dim: bits + 2 x 32/64 (9, 5 or 3) bits per stored element instead of 32 for the token-long
    tensors."""
    config = tiny_config("llama", layers=4, heads=4, kv_heads=2, head_dim=64)
    identity = SharingPlan.identity(4, 2, ns=16, nr=240)
    ratio = pod_kv_bytes(config, identity, 4096, kv_bits=bits) / dense_kv_bytes(config, 4096)
    assert ratio == pytest.approx((bits + 1) / 32)
    # KIVI keys, groups of 64 tokens: the same bits once groups fill; 4100 tokens leave 4 keys per head in fp32
    kivi = pod_kv_bytes(config, identity, 4100, kv_bits=bits, key_quant="channel") - pod_kv_bytes(
        config, identity, 4100, kv_bits=bits)
    assert kivi == 4 * 2 * 4 * 64 * (4 - bits / 8 - 2 * 4 / 64)  # 4 tokens x 8 (layer, head) x 64 channels


@pytest.mark.parametrize("bits,keys,prox", [(8, "token", False), (4, "token", False), (4, "channel", False),
                                            (4, "channel", True), (8, "token", True), (2, "channel", True)])
def test_crop_and_batch_edits_on_quantized_cache(bits, keys, prox):
    model = tiny_model("llama")
    plan = random_plan(4, 2, 3, 6, seed=4, mode="keys")
    ids = ids_for(2, 30, seed=5)
    enable_pod(model, plan)
    with torch.no_grad():  # 27 + 3 tokens in groups of 8: the crops stay in the channel layout's exact residual
        cache = PodCache(model.config, crop_margin=2, kv_bits=bits, kv_group=8, key_quant=keys, kv_keep_proximal=prox)
        model(ids[:, :27], **cache_kwargs(cache))
        first = model(ids[:, 27:], **cache_kwargs(cache)).logits
        cache.crop(-3)
        again = model(ids[:, 27:], **cache_kwargs(cache)).logits
        cache.crop(-3)
        cache.reorder_cache(torch.tensor([1, 0]))
        swapped = model(ids.flip(0)[:, 27:], **cache_kwargs(cache)).logits
    disable_pod(model)
    torch.testing.assert_close(again, first, **dict(zip(("rtol", "atol"), TOL[torch.float32])))
    torch.testing.assert_close(swapped, first.flip(0), **dict(zip(("rtol", "atol"), TOL[torch.float32])))


def test_bad_settings_are_one_line_errors():
    model = tiny_model("llama")
    plan = random_plan(4, 2, 3, 6, seed=4)
    with pytest.raises(PodError, match="'kv_bits' = 3: supported are None .*, 8, 4, 2$"):
        PodCache(model.config, plan, kv_bits=3)
    with pytest.raises(PodError, match="'key_quant' = 'head': choose from token, channel$"):
        PodCache(model.config, plan, kv_bits=8, key_quant="head")
    with pytest.raises(PodError, match="'kv_keep_proximal' = True sets how quantized tensors are held: it needs kv_bits"):
        PodCache(model.config, plan, kv_keep_proximal=True)
    with pytest.raises(PodError, match=r"'key_quant' = 'channel' .* needs kv_bits \(one of 8, 4, 2\)"):
        PodCache(model.config, plan, key_quant="channel")
    with pytest.raises(PodError, match="'kv_group' = 12 must divide the head dim 16"):
        PodCache(model.config, plan, kv_bits=8, kv_group=12)  # before any compute
    # an odd head dim (no RoPE model has one: transformers >= 5.25 refuses such a config, so the store is checked)
    with pytest.raises(PodError, match="'kv_bits' = 4 packs 2 channels per byte: the head dim 15 must be a multiple of 2"):
        QuantTokens(torch.empty(1, 2, 0, 15), 5, bits=4)
    with pytest.raises(PodError, match="'kv_bits' = 2 packs 4 channels per byte: the head dim 18 must be a multiple of 4"):
        QuantTokens(torch.empty(1, 2, 0, 18), 6, bits=2)
    QuantTokens(torch.empty(1, 2, 0, 15), 5, bits=8)  # 8 bits: any head dim


def test_enable_pod_kv_bits_makes_generate_use_a_quantized_cache():
    """enable_pod(..., kv_bits=8 or 4): generate's default PodCache holds that many bits; greedy tokens of the tiny
    model match the fp32 cache's here (4 layers, 12 tokens), and a bad setting fails at enable_pod, before any
    compute."""
    from podkv.compat import output_cache

    plan = random_plan(4, 2, 2, 4, seed=1)
    ids = ids_for(1, 11, seed=2)
    outs = {}
    for bits in (None, 8, 4):
        model = enable_pod(tiny_model("llama"), plan, kv_bits=bits)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                                 return_dict_in_generate=True)
        cache = output_cache(out)
        assert isinstance(cache, PodCache) and cache.kv_bits == bits
        outs[bits] = out.sequences
        assert bits is None or cache.layers[0].v.bits == bits
    assert torch.equal(outs[8], outs[None]) and torch.equal(outs[4], outs[None])
    with pytest.raises(PodError, match="'kv_bits' = 3"):
        enable_pod(tiny_model("llama"), plan, kv_bits=3)
    with pytest.raises(PodError, match="'key_quant' = 'channel' .* needs kv_bits"):
        enable_pod(tiny_model("llama"), plan, key_quant="channel")
