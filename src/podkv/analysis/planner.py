"""The sharing planner: similarity matrices -> :class:`~podkv.plan.SharingPlan` (paper §2.1).

Two ways to choose blocks of consecutive layers, per KV head (PoD) or per layer (PoD-L):

* :func:`plan_by_threshold` — the paper's greedy: walk layers bottom-up; a layer joins the
  current block when its similarity to the block's lowest layer (the anchor) is >= delta,
  otherwise it opens a new block.
* :func:`plan_for_saving` — reach a KV saving ``s`` at a context length with the most similar
  sharing. Memory depends only on the *number* of shared (layer, head) pairs (each drops
  ``T - ns - nr`` distant keys), so ``s`` fixes the smallest pair count ``k`` that reaches it.
  Among all plans with exactly ``k`` shared pairs we take the one maximising the summed
  similarity of every shared layer to its anchor, ``sum S[anchor(l), l]`` — the quantity the
  greedy thresholds one layer at a time. It is solved exactly: a dynamic programme over block
  splits per head (best score for each block count, O(L^3)), then a knapsack over heads for the
  count split (O(H·(LH)^2)). We did not bisect delta: the greedy's shared count moves in jumps
  and is not monotone in delta, so bisection can miss the target or overshoot it by whole blocks.

Window-only pairs (plan policy "window", issue 21) drop their distant keys *and* values: twice a shared
pair's saving. :func:`window_pairs` picks the pairs that need distant tokens least (measured: distant
attention mass + retrieval score, :mod:`podkv.analysis.retrieval`); :func:`plan_for_saving` then keeps each
of them a block of its own and fills the rest of the target with the most similar sharing.
"""

from __future__ import annotations

import math

import torch

from podkv.errors import PodError
from podkv.plan import SharingPlan

GRANULARITIES = ("head", "layer")
# Plan kinds of `podkv analyze --kind`: the paper's greedy (threshold delta), the most similar plan at a
# target saving, the same priced by retrieval scores (analysis/retrieval.py), and uniform blocks.
KINDS = ("greedy", "similarity", "retrieval", "uniform")


def greedy_anchors(sim: torch.Tensor, delta: float) -> list[int]:
    """sim (L, L) -> anchor layer of every layer under the bottom-up greedy with threshold delta."""
    anchors, anchor = [0], 0
    for layer in range(1, sim.shape[0]):
        if float(sim[anchor, layer]) < delta:
            anchor = layer
        anchors.append(anchor)
    return anchors


def best_splits(sim: torch.Tensor, cost: torch.Tensor | None = None,
                alone: frozenset[int] = frozenset()) -> list[tuple[float, list[int]]]:
    """For every block count b = 1..L, the split with the highest summed anchor similarity.

    Returns ``out[b - 1] = (score, anchors)`` where score = sum over non-anchor layers of
    ``sim[anchor, layer] - cost[layer]`` (``cost``: (L,) price of sharing that layer, default 0);
    score -inf where no split into b blocks keeps every layer of ``alone`` a block of its own.
    """
    L = sim.shape[0]
    cost = torch.zeros(L) if cost is None else cost
    neg = -math.inf
    # gain[j][i] = score of one block spanning layers j..i-1 with anchor j
    gain = [[0.0] * (L + 1) for _ in range(L)]
    for j in range(L):
        for i in range(j + 2, L + 1):
            inside = j in alone or (i - 1) in alone
            gain[j][i] = neg if inside or gain[j][i - 1] == neg else gain[j][i - 1] + float(sim[j, i - 1]) - float(cost[i - 1])
    f = [[neg] * (L + 1) for _ in range(L + 1)]  # f[b][i]: layers 0..i-1 in b blocks
    back = [[0] * (L + 1) for _ in range(L + 1)]
    f[0][0] = 0.0
    for b in range(1, L + 1):
        for i in range(b, L + 1):
            for j in range(b - 1, i):
                if f[b - 1][j] > neg and f[b - 1][j] + gain[j][i] > f[b][i]:
                    f[b][i], back[b][i] = f[b - 1][j] + gain[j][i], j
    out = []
    for b in range(1, L + 1):
        starts, i = [], L
        for bb in range(b, 0, -1):
            starts.append(back[bb][i])
            i = back[bb][i]
        starts = sorted(starts)
        anchors = [max(s for s in starts if s <= layer) for layer in range(L)]
        out.append((f[b][L], anchors))
    return out


def pairs_for_saving(saving: float, layers: int, heads: int, context: int, ns: int, nr: int) -> int:
    """Smallest number of shared (layer, head) pairs whose KV saving at ``context`` is >= ``saving``."""
    per_pair = _pair_saving(layers, heads, context, ns, nr)
    reachable = (layers - 1) * heads * per_pair
    if not 0 < saving <= reachable + 1e-12:
        raise PodError(f"--target-saving {saving} is outside what a plan can reach for this model at --context "
                       f"{context} with ns={ns}, nr={nr}: choose a value in (0, {reachable:.4f}]")
    return min(math.ceil(saving / per_pair - 1e-9), (layers - 1) * heads)


def _pair_saving(layers: int, heads: int, context: int, ns: int, nr: int) -> float:
    """Share of dense KV that one shared pair saves at ``context`` (a window-only pair saves twice that)."""
    per_pair = (context - min(context, ns + nr)) / (2 * layers * heads * context)
    if per_pair <= 0:
        raise PodError(f"--context {context} is not longer than ns+nr = {ns + nr}: sharing saves nothing there")
    return per_pair


def plan_by_threshold(sim_kv: torch.Tensor, delta: float, granularity: str = "head", **plan_kw) -> SharingPlan:
    """sim_kv (Hkv, L, L) -> plan from the greedy with threshold ``delta``."""
    _check(sim_kv, granularity)
    if not 0.0 <= delta <= 1.0:
        raise PodError(f"--delta must be in [0, 1] (similarity is 1 - JS divergence in bits), got {delta}")
    H = sim_kv.shape[0]
    if granularity == "layer":
        per_layer = greedy_anchors(sim_kv.mean(0), delta)
        return SharingPlan(anchors=[[a] * H for a in per_layer], **plan_kw)
    per_head = [greedy_anchors(sim_kv[h], delta) for h in range(H)]
    return SharingPlan(anchors=[list(row) for row in zip(*per_head)], **plan_kw)


def window_pairs(importance: torch.Tensor, n: int) -> set[tuple[int, int]]:
    """The ``n`` (layer, KV head) pairs of ``importance`` (L, Hkv) that need distant tokens least."""
    L, H = importance.shape
    if not 0 <= n <= L * H:
        raise PodError(f"--window-pairs must be in [0, {L * H}] (layers x KV heads), got {n}")
    order = sorted(((float(importance[l, h]), l, h) for l in range(L) for h in range(H)))
    return {(l, h) for _, l, h in order[:n]}


def plan_for_saving(sim_kv: torch.Tensor, saving: float, context: int, granularity: str = "head",
                    ns: int = 16, nr: int = 240, cost: torch.Tensor | None = None,
                    window: set[tuple[int, int]] = frozenset(), **plan_kw) -> SharingPlan:
    """sim_kv (Hkv, L, L) -> the most similar plan whose KV saving at ``context`` reaches ``saving``.

    ``cost`` (L, Hkv), optional: the price of sharing each (layer, KV head), subtracted from its
    similarity to the anchor — a retrieval-aware plan prices retrieval heads out of sharing.
    ``window``: (layer, head) pairs that become window-only (each a block of its own); they count twice a
    shared pair towards ``saving``, and sharing supplies the rest.
    """
    _check(sim_kv, granularity)
    H, L = sim_kv.shape[0], sim_kv.shape[1]
    if cost is not None and tuple(cost.shape) != (L, H):
        raise PodError(f"sharing cost must be (layers, kv_heads) = ({L}, {H}), got {tuple(cost.shape)}")
    if window:
        if granularity != "head":
            raise PodError("window-only pairs are chosen per KV head: use --granularity head with --window-pairs")
        return _plan_with_windows(sim_kv, saving, context, ns, nr, cost, window, **plan_kw)
    k = pairs_for_saving(saving, L, H, context, ns, nr)
    if granularity == "layer":
        shared_layers = math.ceil(k / H)
        layer_cost = None if cost is None else cost.sum(1) / H
        _, per_layer = best_splits(sim_kv.mean(0), layer_cost)[L - shared_layers - 1]
        return SharingPlan(anchors=[[a] * H for a in per_layer], ns=ns, nr=nr, **plan_kw)
    splits = [best_splits(sim_kv[h], None if cost is None else cost[:, h]) for h in range(H)]
    choice = _split_pairs(splits, k, L)
    per_head = [splits[h][L - shared - 1][1] for h, shared in enumerate(choice)]
    return SharingPlan(anchors=[list(row) for row in zip(*per_head)], ns=ns, nr=nr, **plan_kw)


def add_windows(plan: SharingPlan, importance: torch.Tensor, n: int) -> SharingPlan:
    """``plan`` with ``n`` more window-only pairs, least needed first, keeping every other pair's anchor: only a
    block's last layer can become window-only without leaving later layers without their anchor, so pairs are
    peeled off block ends. Why: an adapted model keeps the blocks it was trained on (issue 21's Pareto sweep
    on ``smollm2-pod``)."""
    L, H = plan.num_layers, plan.num_kv_heads
    if tuple(importance.shape) != (L, H):
        raise PodError(f"head scores must be (layers, kv_heads) = ({L}, {H}), got {tuple(importance.shape)}")
    anchors = [list(row) for row in plan.anchors]
    window = {(l, h) for l in range(L) for h in range(H) if plan.is_window(l, h)}
    for _ in range(n):
        ends = [(float(importance[l, h]), l, h) for l in range(L) for h in range(H) if (l, h) not in window
                and (l + 1 == L or anchors[l + 1][h] != anchors[l][h])]
        if not ends:
            raise PodError(f"--window-pairs {n}: only {len(window)} pairs can be window-only in this plan")
        _, l, h = min(ends)
        anchors[l][h] = l
        window.add((l, h))
    policies = [["window" if (l, h) in window else "anchor" if a == l else "shared" for h, a in enumerate(row)]
                for l, row in enumerate(anchors)]
    meta = {**plan.meta, "window_pairs": {"n": len(window), "added_to": plan.meta.get("kind", "a plan")}}
    return SharingPlan(anchors=anchors, ns=plan.ns, nr=plan.nr, mode=plan.mode, policies=policies, meta=meta)


def _plan_with_windows(sim_kv, saving, context, ns, nr, cost, window, **plan_kw) -> SharingPlan:
    H, L = sim_kv.shape[0], sim_kv.shape[1]
    per_pair = _pair_saving(L, H, context, ns, nr)
    k = max(0, math.ceil(saving / per_pair - 1e-9) - 2 * len(window))  # shared pairs still needed
    splits = [best_splits(sim_kv[h], None if cost is None else cost[:, h],
                          frozenset(l for l, hh in window if hh == h)) for h in range(H)]
    choice = _split_pairs(splits, k, L)
    if choice is None:
        raise PodError(f"--target-saving {saving} is out of reach with {len(window)} window-only pairs at --context "
                       f"{context}: every window pair must be a block of its own, which limits sharing; lower the "
                       "target or choose more --window-pairs")
    per_head = [splits[h][L - shared - 1][1] for h, shared in enumerate(choice)]
    anchors = [list(row) for row in zip(*per_head)]
    policies = [["window" if (l, h) in window else "anchor" if a == l else "shared" for h, a in enumerate(row)]
                for l, row in enumerate(anchors)]
    return SharingPlan(anchors=anchors, ns=ns, nr=nr, policies=policies, **plan_kw)


def retrieval_shared(plan: SharingPlan, retrieval: torch.Tensor) -> float:
    """Summed retrieval score (L, Hkv) of the shared pairs: how much retrieval a plan gives up."""
    return sum(float(retrieval[l, h]) for l in range(plan.num_layers) for h in range(plan.num_kv_heads)
               if not plan.is_anchor(l, h))


def _split_pairs(splits, k: int, L: int) -> list[int] | None:
    """Knapsack: shared-layer count per head summing to k, maximising the summed best scores (None: no
    feasible count split, when blocks are constrained)."""
    neg = -math.inf
    best = {0: (0.0, [])}
    for head_splits in splits:
        nxt: dict[int, tuple[float, list[int]]] = {}
        for total, (score, picks) in best.items():
            for shared in range(L):  # shared layers of this head: L - blocks
                t = total + shared
                if t > k:
                    break
                cand = score + head_splits[L - shared - 1][0]
                if cand > nxt.get(t, (neg, None))[0]:
                    nxt[t] = (cand, picks + [shared])
        best = nxt
    return best[k][1] if k in best else None


def plan_similarity(plan: SharingPlan, sim_kv: torch.Tensor) -> float:
    """Summed similarity of every shared (layer, head) to its anchor: the planner's objective."""
    return sum(float(sim_kv[h, plan.anchors[l][h], l]) for l in range(plan.num_layers)
               for h in range(plan.num_kv_heads) if not plan.is_anchor(l, h))


def _check(sim_kv: torch.Tensor, granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise PodError(f"--granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if sim_kv.dim() != 3 or sim_kv.shape[1] != sim_kv.shape[2]:
        raise PodError(f"similarity must be (kv_heads, layers, layers), got shape {tuple(sim_kv.shape)}")
