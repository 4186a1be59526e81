"""The planner: the paper's greedy, the exact target-saving search (vs brute force), PoD-L, errors."""

import itertools
import math

import pytest
import torch

from podkv import PodError, SharingPlan
from podkv.analysis import planner


def random_sim(heads, layers, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(heads, layers, layers, generator=g, dtype=torch.float64)
    sim = (a + a.transpose(1, 2)) / 2
    sim[:, range(layers), range(layers)] = 1.0
    return sim


def all_splits(layers):
    """Every split of layers 0..L-1 into consecutive blocks, as anchor lists."""
    for cuts in itertools.product([False, True], repeat=layers - 1):
        anchors, a = [0], 0
        for layer, cut in enumerate(cuts, 1):
            a = layer if cut else a
            anchors.append(a)
        yield anchors


def score(sim, anchors):
    return sum(float(sim[a, l]) for l, a in enumerate(anchors) if a != l)


def test_greedy_follows_the_paper():
    sim = torch.tensor([[1.0, 0.9, 0.6, 0.4, 0.2],
                        [0.9, 1.0, 0.9, 0.9, 0.3],
                        [0.6, 0.9, 1.0, 0.9, 0.8],
                        [0.4, 0.9, 0.9, 1.0, 0.9],
                        [0.2, 0.3, 0.8, 0.9, 1.0]])
    # layer 3 is compared with the anchor (layer 0: 0.4), not with layer 2 (0.9)
    assert planner.greedy_anchors(sim, 0.5) == [0, 0, 0, 3, 3]
    assert planner.greedy_anchors(sim, 0.0) == [0] * 5
    assert planner.greedy_anchors(sim, 1.0) == [0, 1, 2, 3, 4]


def test_threshold_plan_head_and_layer():
    sim = random_sim(3, 6, 0)
    plan = planner.plan_by_threshold(sim, 0.5, "head", ns=4, nr=8)
    for h in range(3):
        assert [plan.anchors[l][h] for l in range(6)] == planner.greedy_anchors(sim[h], 0.5)
    layer_plan = planner.plan_by_threshold(sim, 0.5, "layer", ns=4, nr=8)
    assert layer_plan.is_layer_granular
    assert [row[0] for row in layer_plan.anchors] == planner.greedy_anchors(sim.mean(0), 0.5)


def test_best_splits_match_brute_force():
    sim = random_sim(1, 7, 1)[0]
    best = planner.best_splits(sim)
    for blocks in range(1, 8):
        brute = max(score(sim, a) for a in all_splits(7) if len(set(a)) == blocks)
        got_score, got_anchors = best[blocks - 1]
        assert len(set(got_anchors)) == blocks
        assert abs(got_score - brute) < 1e-9 and abs(score(sim, got_anchors) - brute) < 1e-9


@pytest.mark.parametrize("saving", [0.1, 0.2, 0.3])
def test_target_saving_plan_is_optimal_and_just_reaches_the_target(saving):
    layers, heads, context, ns, nr = 5, 2, 64, 4, 12
    sim = random_sim(heads, layers, 2)
    plan = planner.plan_for_saving(sim, saving, context, "head", ns=ns, nr=nr)
    step = (context - ns - nr) / (2 * layers * heads * context)  # saving of one shared pair
    assert saving <= plan.kv_saving(context) < saving + step
    shared = sum(len(plan.shared_heads(l)) for l in range(layers))
    brute = max(score(sim[0], a) + score(sim[1], b) for a in all_splits(layers) for b in all_splits(layers)
                if (layers - len(set(a))) + (layers - len(set(b))) == shared)
    assert abs(planner.plan_similarity(plan, sim) - brute) < 1e-9


def test_target_saving_layer_granularity():
    sim = random_sim(3, 8, 3)
    plan = planner.plan_for_saving(sim, 0.25, 128, "layer", ns=4, nr=12)
    assert plan.is_layer_granular and plan.kv_saving(128) >= 0.25
    layer_step = 3 * (128 - 16) / (2 * 8 * 3 * 128)
    assert plan.kv_saving(128) < 0.25 + layer_step


def test_planner_errors_name_the_flag():
    sim = random_sim(2, 4, 0)
    with pytest.raises(PodError, match="--delta"):
        planner.plan_by_threshold(sim, 1.5, ns=4, nr=8)
    with pytest.raises(PodError, match="--target-saving .* outside"):
        planner.plan_for_saving(sim, 0.45, 64, ns=4, nr=8)  # at most 3/4 of pairs share: < 0.375
    with pytest.raises(PodError, match="--context"):
        planner.plan_for_saving(sim, 0.1, 12, ns=4, nr=8)
    with pytest.raises(PodError, match="--granularity"):
        planner.plan_by_threshold(sim, 0.5, "block", ns=4, nr=8)


def test_pairs_for_saving_is_the_smallest_count():
    L, H, T, ns, nr = 30, 3, 4096, 16, 240
    k = planner.pairs_for_saving(0.35, L, H, T, ns, nr)
    per = (T - ns - nr) / (2 * L * H * T)
    assert k * per >= 0.35 > (k - 1) * per
    assert math.isclose(SharingPlan.uniform(L, H, L).kv_saving(T), (L - 1) * H * per)


def test_sharing_cost_keeps_a_priced_pair_an_anchor():
    """A huge cost on (layer 3, head 1) keeps it an anchor; the similarity-only plan shares it."""
    sim = random_sim(2, 6, 4)
    sim[1, 2, 3] = sim[1, 3, 2] = 1.0  # make sharing layer 3 of head 1 attractive
    free = planner.plan_for_saving(sim, 0.25, 64, "head", ns=4, nr=12)
    assert not free.is_anchor(3, 1)
    cost = torch.zeros(6, 2, dtype=torch.float64)
    cost[3, 1] = 1e6
    for gran in ("head", "layer"):
        priced = planner.plan_for_saving(sim, 0.25, 64, gran, ns=4, nr=12, cost=cost)
        assert priced.is_anchor(3, 1) and priced.kv_saving(64) >= 0.25
        assert planner.retrieval_shared(priced, cost) == 0.0


def test_no_cost_is_the_similarity_plan():
    """cost=None and an all-zero cost give the same plan (the brute-force optimum tested above)."""
    sim = random_sim(3, 7, 5)
    for gran in ("head", "layer"):
        a = planner.plan_for_saving(sim, 0.3, 64, gran, ns=4, nr=12)
        b = planner.plan_for_saving(sim, 0.3, 64, gran, ns=4, nr=12, cost=torch.zeros(7, 3, dtype=torch.float64))
        assert a.anchors == b.anchors
    with pytest.raises(PodError, match=r"sharing cost must be \(layers, kv_heads\)"):
        planner.plan_for_saving(sim, 0.3, 64, ns=4, nr=12, cost=torch.zeros(3, 7))


def test_best_splits_keep_alone_layers_single_and_stay_optimal():
    sim = random_sim(1, 7, 3)[0]
    alone = frozenset({2, 5})
    best = planner.best_splits(sim, alone=alone)
    for blocks in range(1, 8):
        valid = [a for a in all_splits(7) if len(set(a)) == blocks
                 and all(a[l] == l and (l + 1 == 7 or a[l + 1] != l) for l in alone)]
        got_score, got_anchors = best[blocks - 1]
        if not valid:
            assert got_score == -math.inf
            continue
        assert abs(got_score - max(score(sim, a) for a in valid)) < 1e-9
        assert all(got_anchors[l] == l and (l + 1 == 7 or got_anchors[l + 1] != l) for l in alone)


def test_window_pairs_are_the_least_needed_and_reach_the_saving():
    layers, heads, context, ns, nr = 6, 2, 64, 4, 12
    importance = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.05, 0.6], [0.5, 0.02], [0.4, 0.3], [0.2, 0.95]])
    window = planner.window_pairs(importance, 3)
    assert window == {(2, 0), (3, 1), (0, 1)}
    plan = planner.plan_for_saving(random_sim(heads, layers, 4), 0.3, context, "head", ns=ns, nr=nr, window=window)
    assert {(l, h) for l in range(layers) for h in range(heads) if plan.is_window(l, h)} == window
    step = (context - ns - nr) / (2 * layers * heads * context)
    assert 0.3 <= plan.kv_saving(context) < 0.3 + 2 * step  # a window pair counts twice a shared one


def test_window_planner_errors():
    sim = random_sim(2, 6, 5)
    with pytest.raises(PodError, match="out of reach with 1 window-only pairs"):
        planner.plan_for_saving(sim, 0.45, 64, "head", ns=4, nr=12, window={(0, 0)})
    with pytest.raises(PodError, match="--granularity head"):
        planner.plan_for_saving(sim, 0.2, 64, "layer", ns=4, nr=12, window={(0, 0)})
    with pytest.raises(PodError, match=r"--window-pairs must be in \[0, 12\]"):
        planner.window_pairs(torch.zeros(6, 2), 13)


def test_add_windows_peels_block_ends_least_needed_first():
    plan = SharingPlan(anchors=[[0, 0], [0, 1], [0, 1], [3, 1]], ns=2, nr=4, mode="scores")
    importance = torch.tensor([[0.0, 0.9], [0.1, 0.2], [0.5, 0.3], [0.4, 0.8]])
    # block ends: (2, 0) [0.5], (3, 0) [0.4], (3, 1) [0.8]; (0, 0) and (1, 0) are read by later layers
    out = planner.add_windows(plan, importance, 2)
    assert {(l, h) for l in range(4) for h in range(2) if out.is_window(l, h)} == {(3, 0), (2, 0)}
    assert out.anchors[2][0] == 2 and out.mode == "scores"
    assert out.kv_saving(64) > plan.kv_saving(64)
    # a window pair's predecessor becomes a block end: (1, 0) next [0.1]
    assert planner.add_windows(out, importance, 1).is_window(1, 0)
    with pytest.raises(PodError, match="only 8 pairs can be window-only"):
        planner.add_windows(plan, importance, 9)
