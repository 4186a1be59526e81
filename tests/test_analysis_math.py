"""Similarity math, the attention probe and the proximal mask, checked against plain oracles."""

import pytest
import torch

from podkv.analysis.probe import DistantProbe, ProximalProbe, active, probed
from podkv.analysis.similarity import js_similarity
from tiny import tiny_model
from tolerances import assert_close


def test_js_similarity_extremes_and_invariants():
    p = torch.softmax(torch.randn(5, 3, 20, generator=torch.Generator().manual_seed(0)), -1)
    p[1] = p[0]  # identical -> 1
    p[3] = 0.0
    p[3, :, 0] = 1.0
    p[4] = 0.0
    p[4, :, 1] = 1.0  # disjoint from layer 3 -> JS = 1 bit -> similarity 0
    sim = js_similarity(p)
    assert torch.equal(sim, sim.T)
    assert torch.equal(torch.diagonal(sim), torch.ones(5, dtype=torch.float64))
    assert abs(sim[0, 1] - 1) < 1e-6 and abs(sim[3, 4]) < 1e-6
    assert bool(((sim >= 0) & (sim <= 1)).all())


def test_js_similarity_matches_scipy_style_formula():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, 1, 30, generator=g, dtype=torch.float64), -1)
    a, b = p[0, 0], p[1, 0]
    m = (a + b) / 2
    kl = lambda x, y: float((x * torch.log2(x / y)).sum())  # noqa: E731
    expected = 1 - 0.5 * (kl(a, m) + kl(b, m))
    assert abs(float(js_similarity(p)[0, 1]) - expected) < 1e-9


def test_probe_does_not_change_outputs_and_records_distant_attention():
    """DistantProbe == eager full attention of the last Q rows, renormalised over distant keys."""
    model = tiny_model("llama", layers=3)
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    ns, nr, Q = 4, 16, 8
    with torch.no_grad():
        stock = model(ids).logits
        model.set_attn_implementation("eager")
        eager = model(ids, output_attentions=True)
        model.set_attn_implementation("sdpa")
        probe = DistantProbe(last_q=Q, ns=ns, nr=nr)
        with probed(model), active(probe):
            probed_logits = model(ids).logits
    assert model.config._attn_implementation == "sdpa"
    assert_close(probed_logits, stock, what="probed vs stock logits")
    T = ids.shape[1]
    for layer, attn in enumerate(eager.attentions):  # (1, Hq, T, T)
        rows = attn[0, :, -Q:, ns:T - nr].clone()
        for i, t in enumerate(range(T - Q, T)):
            rows[:, i, t - nr - ns + 1:] = 0.0  # keys within the recent window are not distant
        expected = rows / rows.sum(-1, keepdim=True)
        assert_close(probe.attn[layer], expected, what=f"layer {layer} distant attention")


@pytest.mark.parametrize("size", [8, 20])
def test_proximal_mask_is_sinks_plus_recent(size):
    mask = ProximalProbe(size=size, ns=4).mask(40, "cpu")[0, 0]
    for t in (0, 10, 39):
        visible = set(torch.nonzero(mask[t]).flatten().tolist())
        expected = {j for j in range(t + 1) if j < 4 or j > t - (size - 4)}
        assert visible == expected
        assert len(visible) == min(t + 1, size)


def test_proximal_probe_covering_everything_equals_full_attention():
    model = tiny_model("qwen2", layers=2)
    ids = torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stock = model(ids).logits
        with probed(model), active(ProximalProbe(size=32, ns=4)):
            full_window = model(ids).logits
        with probed(model), active(ProximalProbe(size=8, ns=4)):
            short = model(ids).logits
    assert_close(full_window, stock, what="proximal window >= T")
    assert_close(short[:, :8], stock[:, :8], what="first positions see everything anyway")
    assert (short[:, 8:] - stock[:, 8:]).abs().max() > 1e-3
