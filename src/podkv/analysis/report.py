"""Files written by `podkv analyze`: plan.json, analysis.json, analysis.md, proximal.png, similarity.png
(and retrieval.png when retrieval heads were measured)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from podkv.analysis.planner import plan_similarity, retrieval_shared
from podkv.io import atomic_write_text, save_figure, write_json
from podkv.plan import SharingPlan


def _r(t: torch.Tensor, digits: int = 5):
    return [[round(float(x), digits) for x in row] for row in t]


def similarity_summary(sim_q: torch.Tensor, sim_kv: torch.Tensor) -> dict:
    """sim_q (Hq, L, L), sim_kv (Hkv, L, L) -> JSON-ready matrices and headline numbers."""
    L = sim_kv.shape[-1]
    off = ~torch.eye(L, dtype=torch.bool)
    adjacent = torch.stack([torch.diagonal(s, offset=1) for s in sim_kv])  # (Hkv, L-1)
    return {
        "measure": "1 - Jensen-Shannon divergence (log base 2) of distant-token attention, renormalised",
        "kv_heads": [_r(s) for s in sim_kv],
        "query_heads": [_r(s) for s in sim_q],
        "layer_mean": _r(sim_kv.mean(0)),
        "adjacent_mean": round(float(adjacent.mean()), 4),
        "adjacent_mean_per_kv_head": [round(float(a.mean()), 4) for a in adjacent],
        "offdiag_mean": round(float(sim_kv[:, off].mean()), 4),
    }


def retrieval_summary(scores: dict, cfg) -> dict:
    """head_scores output + settings -> JSON-ready (layers, kv_heads) matrices."""
    return {"measure": "max over a KV head's query heads of attention mass: distant_mass = last queries on "
                       "distant tokens; retrieval = answer tokens on the needle's value (lookup prompts, plan split)",
            "samples": cfg.retrieval_samples, "length": cfg.length, "last_q": cfg.last_q,
            "distant_mass": _r(scores["distant_mass"]), "retrieval": _r(scores["retrieval"])}


def plan_summary(plan: SharingPlan, sim_kv: torch.Tensor, context: int, retrieval: torch.Tensor | None = None) -> dict:
    shared = sum(len(plan.shared_heads(l)) for l in range(plan.num_layers))
    out = {"kind": plan.meta.get("kind"), "context": context, "kv_saving": round(plan.kv_saving(context), 6),
           "shared_pairs": shared, "pairs": plan.num_layers * plan.num_kv_heads,
           "layer_granular": plan.is_layer_granular, "anchor_similarity_sum": round(plan_similarity(plan, sim_kv), 4),
           "blocks": [plan.blocks(h) for h in range(plan.num_kv_heads)], "grid": plan.grid().splitlines()}
    if retrieval is not None:
        out["retrieval_shared"] = round(retrieval_shared(plan, retrieval), 4)
    return out


def write_all(out: Path, result: dict, plan: SharingPlan, sim_q: torch.Tensor, sim_kv: torch.Tensor,
              scores: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")
    write_json(out / "analysis.json", result)
    atomic_write_text(out / "analysis.md", markdown(result))
    proximal_figure(result.get("proximal"), out / "proximal.png")
    similarity_figure(sim_kv, out / "similarity.png")
    if scores is not None:
        retrieval_figure(scores, out / "retrieval.png")


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# podkv analyze — {result['model']}", "",
             f"podkv {result['podkv_version']}, seed {result['seed']}, data sha256 `{result['data_sha256'][:16]}…` "
             f"({', '.join(result['data']['source'])}), {result['data']['samples_used']} samples x {s['length']} "
             f"tokens, last {s['last_q']} queries, ns={s['ns']}, nr={s['nr']}.", ""]
    prox = result.get("proximal")
    if prox:
        lines += ["## Proximal tokens only vs full attention (observation 1)", "",
                  f"Positions {prox['eval_positions_from']}…T-2 of each sample; full-attention NLL "
                  f"{prox['nll_full']:.3f}.", "",
                  "| proximal size | ns | nr | same greedy token | NLL | ΔNLL |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['size']} | {r['ns']} | {r['nr']} | {100 * r['agreement']:.1f}% | {r['nll']:.3f} | "
                  f"{r['nll_delta']:+.3f} |" for r in prox["rows"]]
        lines.append("")
    sim = result["similarity"]
    lines += ["## Inter-layer similarity of distant-token attention (observation 2)", "",
              f"Similarity = {sim['measure']}. Mean over adjacent layers: {sim['adjacent_mean']:.3f}; "
              f"over all layer pairs: {sim['offdiag_mean']:.3f}.", "",
              "| KV head | adjacent-layer mean |", "|---:|---:|"]
    lines += [f"| {h} | {a:.3f} |" for h, a in enumerate(sim["adjacent_mean_per_kv_head"])]
    retr = result.get("retrieval")
    if retr:
        lines += ["", "## Retrieval heads", "",
                  f"{retr['samples']} lookup prompts x {retr['length']} tokens. (Layer, KV head) pairs with the "
                  "highest retrieval score (attention of the answer on the needle's value):", "",
                  "| layer | KV head | retrieval | distant mass |", "|---:|---:|---:|---:|"]
        flat = sorted(((v, l, h) for l, row in enumerate(retr["retrieval"]) for h, v in enumerate(row)), reverse=True)
        lines += [f"| {l} | {h} | {v:.3f} | {retr['distant_mass'][l][h]:.3f} |" for v, l, h in flat[:10]]
    plan = result["plan"]
    kind = s.get("kind") or ("similarity" if s["target_saving"] is not None else "greedy")
    how = {"greedy": f"threshold δ={s['delta']}", "uniform": f"blocks of {s.get('block_size')} layers",
           "retrieval": f"target saving {s['target_saving']}, retrieval weight {s.get('retrieval_weight')}"
           }.get(kind, f"target saving {s['target_saving']}")
    lost = f"; retrieval score of the shared pairs {plan['retrieval_shared']:.2f}" if "retrieval_shared" in plan else ""
    lines += ["", "## Sharing plan", "",
              f"kind {kind} ({how}), granularity {s['granularity']}: {plan['shared_pairs']}/{plan['pairs']} "
              f"(layer, KV head) pairs share keys; expected KV saving at {plan['context']} tokens: "
              f"**{100 * plan['kv_saving']:.1f}%**{lost}.", "", "```", *plan["grid"], "```", ""]
    return "\n".join(lines)


def proximal_figure(prox: dict | None, path: Path) -> None:
    import matplotlib  # startup: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # startup: matplotlib

    fig, ax = plt.subplots(figsize=(6, 4))
    if not prox or not prox["rows"]:
        ax.text(0.5, 0.5, "proximal study not run", ha="center", va="center")
        ax.set_axis_off()
    else:
        sizes = [r["size"] for r in prox["rows"]]
        ax.plot(sizes, [100 * r["agreement"] for r in prox["rows"]], "o-", color="tab:blue")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("proximal tokens (ns sinks + recent window)")
        ax.set_ylabel("same greedy next token as full attention (%)", color="tab:blue")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot(sizes, [r["nll_delta"] for r in prox["rows"]], "s--", color="tab:red")
        ax2.set_ylabel("NLL increase (nats/token)", color="tab:red")
        ax.set_title("Proximal tokens only vs full attention")
    save_figure(fig, path)
    plt.close(fig)


def similarity_figure(sim_kv: torch.Tensor, path: Path) -> None:
    """One L x L heatmap per KV head plus the head mean, shared 0..1 colour scale."""
    import matplotlib  # startup: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # startup: matplotlib

    mats = list(sim_kv) + ([sim_kv.mean(0)] if sim_kv.shape[0] > 1 else [])
    titles = [f"KV head {h}" for h in range(sim_kv.shape[0])] + (["mean of KV heads"] if len(mats) > 1 else [])
    cols = min(len(mats), 2 if len(mats) <= 4 else 4)
    rows = math.ceil(len(mats) / cols)
    # Shared scale from a round floor of the data to 1, so small differences stay visible.
    low = min(0.5, math.floor(10 * float(sim_kv.min())) / 10)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4.2 * rows), squeeze=False, layout="constrained")
    L = sim_kv.shape[-1]
    ticks = list(range(0, L, max(1, L // 6)))
    for ax, mat, title in zip(axes.flat, mats, titles):
        im = ax.imshow(mat.numpy(), vmin=low, vmax=1, cmap="viridis", origin="lower")
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
    for ax in list(axes.flat)[len(mats):]:
        ax.set_axis_off()
    fig.suptitle("Inter-layer similarity of distant-token attention\n(1 − JS divergence, base 2)", y=1.06)
    fig.colorbar(im, ax=axes, shrink=0.8, label="similarity")
    save_figure(fig, path)
    plt.close(fig)


def retrieval_figure(scores: dict, path: Path) -> None:
    """Distant-attention mass and retrieval score per (layer, KV head), side by side."""
    import matplotlib  # startup: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # startup: matplotlib

    fig, axes = plt.subplots(1, 2, figsize=(7, 6), layout="constrained")
    for ax, key, title in zip(axes, ("distant_mass", "retrieval"), ("distant-attention mass", "retrieval score")):
        mat = scores[key].float()
        im = ax.imshow(mat.numpy(), vmin=0, vmax=max(1e-6, float(mat.max())), cmap="magma", aspect="auto",
                       origin="lower")
        ax.set_title(title)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(mat.shape[1]))
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Retrieval heads (lookup prompts)")
    save_figure(fig, path)
    plt.close(fig)
